"""``HubEndpoint``: where a hub is, validated once, carried through the environment, JSON and Ray."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from rayflow.errors import ConfigError
from rayflow.swarm.job import AgentRef, Job, TaskList
from rayflow.swarm.worker_core import WorkerPlan
from rayflow.wire.hub_client import HubClient
from rayflow.wire.hub_endpoint import HubEndpoint

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
ENDPOINT = HubEndpoint("10.0.0.1", 4433, PEM, region="eu-central", server_name="hub.internal")
ENV = {
    "RAYFLOW_HUB_HOST": "10.0.0.1",
    "RAYFLOW_HUB_PORT": "4433",
    "RAYFLOW_HUB_CA": PEM.decode(),
}


# --- validation -------------------------------------------------------------------------------
@pytest.mark.parametrize("port", [0, 65536, -1, True, "4433"])
def test_an_endpoint_refuses_a_port_that_is_not_one(port: object) -> None:
    with pytest.raises(ConfigError):
        HubEndpoint("10.0.0.1", port, PEM)  # type: ignore[arg-type]


@pytest.mark.parametrize("host", ["", "   "])
def test_an_endpoint_refuses_an_empty_host(host: str) -> None:
    with pytest.raises(ConfigError):
        HubEndpoint(host, 4433, PEM)


@pytest.mark.parametrize("ca_pem", [b"", b"not a certificate", PEM.decode()])
def test_an_endpoint_refuses_a_ca_that_is_not_pem_bytes(ca_pem: object) -> None:
    with pytest.raises(ConfigError):
        HubEndpoint("10.0.0.1", 4433, ca_pem)  # type: ignore[arg-type]


def test_an_endpoint_refuses_an_empty_server_name() -> None:
    with pytest.raises(ConfigError):
        HubEndpoint("10.0.0.1", 4433, PEM, server_name="")


def test_an_endpoint_checks_the_certificate_against_localhost_by_default() -> None:
    assert HubEndpoint("10.0.0.1", 4433, PEM).server_name == "localhost"


# --- the environment --------------------------------------------------------------------------
def test_an_endpoint_round_trips_through_its_environment_variables_but_the_region() -> None:
    regionless = HubEndpoint("10.0.0.1", 4433, PEM, server_name="hub.internal")

    assert HubEndpoint.from_env(ENDPOINT.to_env()) == regionless


def test_the_environment_of_an_endpoint_carries_no_token() -> None:
    assert "RAYFLOW_HUB_TOKEN" not in ENDPOINT.to_env()


def test_from_env_takes_the_ca_as_pem_text() -> None:
    assert HubEndpoint.from_env(ENV).ca_pem == PEM


def test_from_env_reads_the_ca_from_the_file_it_names(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_bytes(PEM)

    assert HubEndpoint.from_env({**ENV, "RAYFLOW_HUB_CA": str(ca)}).ca_pem == PEM


def test_from_env_refuses_a_ca_file_that_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        HubEndpoint.from_env({**ENV, "RAYFLOW_HUB_CA": str(tmp_path / "absent.pem")})


def test_from_env_refuses_a_ca_file_that_holds_no_certificate(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("hello")

    with pytest.raises(ConfigError):
        HubEndpoint.from_env({**ENV, "RAYFLOW_HUB_CA": str(ca)})


def test_from_env_names_every_missing_variable() -> None:
    with pytest.raises(ConfigError) as caught:
        HubEndpoint.from_env({"RAYFLOW_HUB_PORT": "4433", "RAYFLOW_HUB_CA": " "})

    assert caught.value.details["missing"] == "RAYFLOW_HUB_HOST, RAYFLOW_HUB_CA"


@pytest.mark.parametrize("port", ["hub", "0", "70000"])
def test_from_env_refuses_a_bad_port(port: str) -> None:
    with pytest.raises(ConfigError):
        HubEndpoint.from_env({**ENV, "RAYFLOW_HUB_PORT": port})


def test_from_env_takes_the_server_name_when_given() -> None:
    endpoint = HubEndpoint.from_env({**ENV, "RAYFLOW_HUB_SERVER_NAME": "hub.internal"})

    assert endpoint.server_name == "hub.internal"


# --- plain values and Ray ---------------------------------------------------------------------
def test_an_endpoint_round_trips_through_json() -> None:
    assert HubEndpoint.from_dict(json.loads(json.dumps(ENDPOINT.to_dict()))) == ENDPOINT


def test_from_dict_takes_the_ca_as_bytes_too() -> None:
    assert HubEndpoint.from_dict({**ENDPOINT.to_dict(), "ca_pem": PEM}) == ENDPOINT


def test_from_dict_names_the_missing_fields() -> None:
    with pytest.raises(ConfigError) as caught:
        HubEndpoint.from_dict({"host": "10.0.0.1"})

    assert caught.value.details["missing"] == "port, ca_pem"


def test_an_endpoint_survives_pickling_as_ray_sends_it() -> None:
    assert pickle.loads(pickle.dumps(ENDPOINT)) == ENDPOINT


# --- users of an endpoint ---------------------------------------------------------------------
def test_a_client_built_for_an_endpoint_pins_its_ca_and_checks_its_server_name() -> None:
    rpc = HubClient.for_endpoint(ENDPOINT, token="tok").rpc

    assert (rpc.host, rpc.port, rpc.ca_pem, rpc.server_name) == ("10.0.0.1", 4433, PEM, "hub.internal")


def test_a_worker_plan_gives_sandboxes_the_ca_and_server_name_but_leaves_the_address_to_the_backend() -> None:
    plan = WorkerPlan.for_job(Job(AgentRef.shell("true"), TaskList([{}]), name="t"), ENDPOINT)

    assert plan.spec.env == {"RAYFLOW_HUB_CA": PEM.decode(), "RAYFLOW_HUB_SERVER_NAME": "hub.internal"}
