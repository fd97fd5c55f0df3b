"""The ``rayflow`` command: the demo job and tools for a local ReasoningBank."""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from rayflow.config import Config, load_config
from rayflow.errors import RayflowError
from rayflow.sandbox.image import DEFAULT_WITH_HUB_CLIENT
from rayflow.views.retrieval_table import retrieval_table

if TYPE_CHECKING:
    from rayflow.swarm.job import Job

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
memory_app = typer.Typer(no_args_is_help=True, help="Work with a local ReasoningBank.")
app.add_typer(memory_app, name="memory")
hub_app = typer.Typer(no_args_is_help=True, help="Run a ReasoningBank hub; list the ops it serves.")
app.add_typer(hub_app, name="hub")
token_app = typer.Typer(no_args_is_help=True, help="Issue and revoke hub tokens (on the hub's host).")
app.add_typer(token_app, name="token")
sandbox_app = typer.Typer(no_args_is_help=True, help="Sandbox images and housekeeping.")
app.add_typer(sandbox_app, name="sandbox")

console = Console()
err_console = Console(stderr=True)

StateDirOption = typer.Option(
    None, "--state-dir", help="State directory (default: $RAYFLOW_STATE_DIR or ~/.rayflow)."
)
TenantOption = typer.Option("default", "--tenant", "-t", help="Tenant to act for.")


def _config(state_dir: Optional[Path]) -> Config:
    overrides = {} if state_dir is None else {"state_dir": state_dir}
    return load_config(overrides)


def _open_bank(state_dir: Optional[Path]):  # noqa: ANN202 - returns ReasoningBank, imported lazily
    from rayflow.memory.bank import ReasoningBank

    config = _config(state_dir)
    return ReasoningBank(config.state_dir, config=config)


def _when(ts: Optional[float]) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


@memory_app.command("tenant-add")
def tenant_add(name: str, state_dir: Optional[Path] = StateDirOption) -> None:
    """Create a tenant (and its data-encryption key)."""
    with _open_bank(state_dir) as bank:
        bank.create_tenant(name)
        console.print(f"tenant [bold]{name}[/] ready")


@memory_app.command("tenants")
def tenants(state_dir: Optional[Path] = StateDirOption) -> None:
    """List tenants."""
    with _open_bank(state_dir) as bank:
        for name in bank.tenants():
            console.print(name)


@memory_app.command("add")
def add(
    title: str = typer.Option(..., help="Short title of the strategy or lesson."),
    content: str = typer.Option(..., help="The memory itself."),
    description: str = typer.Option("", help="One sentence on when it applies."),
    namespace: str = typer.Option("default", "--namespace", "-n"),
    tag: list[str] = typer.Option([], "--tag", help="A tag (repeatable)."),
    domain: str = typer.Option(""),
    outcome: str = typer.Option("success", help="success or failure"),
    confidence: float = typer.Option(0.5, min=0.0, max=1.0),
    tenant: str = TenantOption,
    create_tenant: bool = typer.Option(False, "--create-tenant", help="Create the tenant if missing."),
    state_dir: Optional[Path] = StateDirOption,
) -> None:
    """Store one memory item."""
    with _open_bank(state_dir) as bank:
        if create_tenant:
            bank.create_tenant(tenant)
        item = bank.store_item(
            tenant,
            namespace=namespace,
            title=title,
            description=description,
            content=content,
            tags=tag,
            domain=domain,
            outcome=outcome,
            confidence=confidence,
            source_agent="cli",
        )
        console.print(item.id)


@memory_app.command("search")
def search(
    query: str,
    k: int = typer.Option(5, "-k", min=1, max=1000),
    namespace: str = typer.Option("", "--namespace", "-n", help="Namespace prefix (default: all)."),
    domain: Optional[str] = typer.Option(None),
    outcome: Optional[str] = typer.Option(None, help="success or failure"),
    min_confidence: float = typer.Option(0.0, min=0.0, max=1.0),
    mmr_lambda: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="1 = relevance only."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    tenant: str = TenantOption,
    state_dir: Optional[Path] = StateDirOption,
) -> None:
    """Retrieve memory for a query, showing each component of the score."""
    with _open_bank(state_dir) as bank:
        results = bank.retrieve(
            tenant,
            query,
            k=k,
            namespace=namespace,
            domain=domain,
            outcome=outcome,
            min_confidence=min_confidence,
            mmr_lambda=mmr_lambda,
        )
    if as_json:
        print(
            json.dumps(
                [
                    {
                        "rank": r.rank,
                        "id": r.item.id,
                        "title": r.item.title,
                        "namespace": r.item.namespace,
                        "outcome": r.item.outcome.value,
                        "score": r.score,
                        "similarity": r.similarity,
                        "recency": r.recency,
                        "reliability": r.reliability,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
        return
    console.print(retrieval_table(results, f"{len(results)} result(s) for {query!r}", with_ids=True))


@memory_app.command("show")
def show(item_id: str, tenant: str = TenantOption, state_dir: Optional[Path] = StateDirOption) -> None:
    """Show one item with its counters and links."""
    with _open_bank(state_dir) as bank:
        item = bank.get(tenant, item_id)
        links = bank.links(tenant, item_id)
    console.print(f"[bold]{item.title}[/]  ({item.id})")
    console.print(f"namespace {item.namespace}  domain {item.domain or '-'}  outcome {item.outcome.value}")
    console.print(f"tags {', '.join(item.tags) or '-'}")
    console.print(
        f"uses {item.uses}  successes {item.successes}  failures {item.failures}  "
        f"reliability {item.reliability:.3f} (prior {item.prior_confidence:.2f})"
    )
    console.print(f"created {_when(item.created_at)}  last used {_when(item.last_used_at)}")
    if item.description:
        console.print(f"\n{item.description}")
    console.print(f"\n{item.content}")
    for src, kind, dst in links:
        console.print(f"link: {src} {kind} {dst}")


@memory_app.command("stats")
def stats(tenant: str = TenantOption, state_dir: Optional[Path] = StateDirOption) -> None:
    """Counts and health of one tenant's memory."""
    with _open_bank(state_dir) as bank:
        figures = bank.stats(tenant)
    table = Table(title=f"ReasoningBank · tenant {tenant}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for key, value in figures.items():
        table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
    console.print(table)


@memory_app.command("consolidate")
def consolidate(
    tenant: str = TenantOption,
    full: bool = typer.Option(False, help="Compare every item, not only those added since the last run."),
    state_dir: Optional[Path] = StateDirOption,
) -> None:
    """Merge duplicates, link contradictions, prune stale low-confidence items."""
    with _open_bank(state_dir) as bank:
        report = bank.consolidate(tenant, full=full)
    console.print(
        f"examined {report.examined}, merged {report.merged}, "
        f"contradictions {report.contradictions}, pruned {report.pruned}"
    )


@hub_app.command("serve")
def hub_serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (UDP)."),
    port: int = typer.Option(4433, help="UDP port (0 picks a free one)."),
    region: str = typer.Option("", help="Region this hub serves."),
    state_dir: Optional[Path] = StateDirOption,
) -> None:
    """Serve the ReasoningBank over QUIC until interrupted (no Ray needed)."""
    import asyncio
    import signal

    from rayflow.hub.server import HubServer

    config = _config(state_dir)

    async def serve() -> None:
        async with HubServer(config.state_dir, host=host, port=port, region=region, config=config) as hub:
            bound_host, bound_port = hub.address
            endpoint = {"host": bound_host, "port": bound_port, "ca": str(config.state_dir / "tls" / "ca.pem")}
            (config.state_dir / "hub-endpoint.json").write_text(json.dumps(endpoint) + "\n")
            console.print(f"hub listening on {bound_host}:{bound_port} (UDP, QUIC, ALPN rayflow/1)")
            console.print(f"clients pin the CA at {endpoint['ca']}")
            console.print("issue a token with: rayflow token issue --tenant NAME --sub AGENT")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            console.print("stopping")

    asyncio.run(serve())


@hub_app.command("ops")
def hub_ops(as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """List the ops a hub serves: token scope, 0-RTT safety, arguments (name? = optional), purpose."""
    from rayflow.wire.hub_ops import describe_ops, format_args

    rows = describe_ops()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"hub ops ({len(rows)})")
    for column in ("op", "scope", "0-RTT", "arguments", "what it does"):
        table.add_column(column)
    for row in rows:
        early = "yes" if row["idempotent"] else "no"
        arguments = format_args(row["args"]) or "-"
        table.add_row(row["op"], row["scope"], early, escape(arguments), escape(row["summary"]))
    console.print(table)


@token_app.command("issue")
def token_issue(
    tenant: str = typer.Option(..., help="Tenant the token acts for."),
    sub: str = typer.Option(..., help="Subject: the sandbox or agent id."),
    namespace: list[str] = typer.Option(["*"], "--namespace", "-n", help="Pattern: 'a/b', 'a/*' or '*'."),
    scope: list[str] = typer.Option(
        ["reasoningbank:read", "reasoningbank:write"], "--scope", help="reasoningbank:read|write, admin"
    ),
    ttl: Optional[int] = typer.Option(None, help="Lifetime in seconds (default 300)."),
    state_dir: Optional[Path] = StateDirOption,
) -> None:
    """Print a new token signed with the hub's active key."""
    from rayflow.auth.issuer import TokenIssuer
    from rayflow.auth.keys import KeyRing
    from rayflow.hub.server import signing_keys_path

    config = _config(state_dir)
    issuer = TokenIssuer(KeyRing.load_or_create(signing_keys_path(config.state_dir)))
    print(issuer.issue(sub, tenant, namespace, scope, ttl_s=ttl))


@token_app.command("revoke")
def token_revoke(
    token_or_jti: str = typer.Argument(..., help="The token itself, or its jti."),
    expires_at: Optional[float] = typer.Option(None, help="With a bare jti: when the token expires (epoch s)."),
    reason: str = typer.Option("revoked from the command line"),
    state_dir: Optional[Path] = StateDirOption,
) -> None:
    """Add a token to the hub's deny-list (seen by a running hub within a second)."""
    import time

    import jwt

    from rayflow.auth.revocation import RevocationList
    from rayflow.errors import InvalidInputError
    from rayflow.hub.server import revocations_path

    config = _config(state_dir)
    if token_or_jti.count(".") == 2:
        try:
            # Only the jti and exp are read; revoking needs no proof that the token is valid.
            payload = jwt.decode(token_or_jti, options={"verify_signature": False})
            jti, exp = str(payload["jti"]), float(payload["exp"])
        except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
            raise InvalidInputError("not a token with a jti and exp") from exc
    else:
        jti, exp = token_or_jti, expires_at if expires_at is not None else time.time() + 24 * 3600
    revocations = RevocationList(revocations_path(config.state_dir))
    try:
        revocations.revoke(jti, exp, reason)
    finally:
        revocations.close()
    console.print(f"revoked {jti}")


@app.command("audit")
def audit(
    tenant: Optional[str] = typer.Option(None, "--tenant", "-t", help="Only this tenant."),
    limit: int = typer.Option(50, min=1, max=100_000),
    as_json: bool = typer.Option(False, "--json"),
    state_dir: Optional[Path] = StateDirOption,
) -> None:
    """Show the newest audited hub operations."""
    from rayflow.memory.store import Store, default_database_path

    config = _config(state_dir)
    store = Store(default_database_path(config.state_dir))
    try:
        records = store.audit_records(tenant=tenant, limit=limit)
    finally:
        store.close()
    if as_json:
        print(json.dumps([r.__dict__ for r in records], indent=2))
        return
    table = Table(title=f"audit ({len(records)} newest)")
    for column in ("time", "actor", "tenant", "op", "namespace", "outcome", "ms"):
        table.add_column(column)
    for r in records:
        latency = "-" if r.latency_ms is None else f"{r.latency_ms:.2f}"
        table.add_row(_when(r.at), r.actor, r.tenant, r.op, r.namespace, r.outcome, latency)
    console.print(table)


@sandbox_app.command("build-image")
def sandbox_build_image(
    tag: str = typer.Option("rayflow-sandbox:latest", help="Image tag to build."),
    method: str = typer.Option("debootstrap", help="debootstrap (offline) or dockerfile (needs a registry)."),
    with_hub_client: bool = typer.Option(
        DEFAULT_WITH_HUB_CLIENT, help="Ship the hub client's packages (about +21 MB), so agents reach memory."
    ),
    force: bool = typer.Option(False, help="Rebuild even when the image is current."),
) -> None:
    """Build the sandbox image without a registry (cached by content hash)."""
    from rayflow.views.sandbox_console import build_image_command

    build_image_command(tag, method, with_hub_client, force)


@sandbox_app.command("gc")
def sandbox_gc(
    backend: list[str] = typer.Option([], "--backend", "-b", help="docker, local, process (default: all available)."),
) -> None:
    """Remove sandboxes, networks and rules whose owner process is gone."""
    from rayflow.views.sandbox_console import gc_command

    raise typer.Exit(gc_command(backend))


@app.command("demo")
def demo(
    modules: int = typer.Option(24, min=1, help="Broken modules the swarm fixes."),
    workers: int = typer.Option(2, min=1, help="Sandboxed workers at once."),
    backend: str = typer.Option("auto", help="Sandbox backend: auto, docker, local or process."),
    seed: int = typer.Option(0, help="Seed of the generated codebase."),
    out: Path = typer.Option(Path("rayflow-demo-out"), help="Where timelines, plots and JSON go."),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)."
    ),
    progress: bool = typer.Option(True, help="Show live progress bars."),
    memory_only: bool = typer.Option(
        False, "--memory-only", help="Run the ReasoningBank walkthrough instead (no Ray, no sandboxes)."
    ),
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir", help="With --memory-only: where the bank lives (default: a temporary directory)."
    ),
    plot: Optional[Path] = typer.Option(
        Path("demo-reliability.png"), help="With --memory-only: where to save the learning plot."
    ),
) -> None:
    """Run the main demo job: a swarm fixes a codebase with memory off, then twice with memory."""
    if memory_only:
        from rayflow.jobs.memory_demo import run_memory_demo

        run_memory_demo(console, state_dir=state_dir, plot_path=plot)
        return
    from rayflow.jobs.demo import EXIT_MEMORY_UNUSABLE, DemoSettings, memory_unusable_message, run_demo

    settings = DemoSettings(
        modules=modules, workers=workers, backend=backend, seed=seed, out=out, address=address, progress=progress
    )
    result = run_demo(settings, console)
    unusable = memory_unusable_message(result.outcomes)
    if unusable is not None:
        console.print(f"[bold red]error[/] \\[memory_unusable] {escape(unusable)}")
        raise typer.Exit(EXIT_MEMORY_UNUSABLE)
    if not (result.numbers["all_passed"] and result.numbers["exactly_once"]):
        raise typer.Exit(1)


def _load_tasks(path: Path) -> list[dict]:
    """Task payloads from a JSON file: a list of objects, or ``{"tasks": [...]}``."""
    from rayflow.errors import InvalidInputError

    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise InvalidInputError(f"{path} is not JSON: {exc}") from None
    if isinstance(data, dict):
        data = data.get("tasks")
    if not isinstance(data, list) or not all(isinstance(task, dict) for task in data):
        raise InvalidInputError(f"{path} must hold a list of task objects (or {{'tasks': [...]}})")
    return data


def job_from_options(
    *,
    agent_shell: Optional[str],
    agent_python: Optional[str],
    tasks: Optional[Path],
    glob: Optional[str],
    repo: Optional[Path],
    upload: Optional[Path] = None,
    name: str = "",
    workers: int = 4,
    backend: str = "auto",
    memory: bool = True,
    namespaces: tuple[str, ...] = (),
    tenant: str = "default",
    agent_timeout_s: float = 600.0,
) -> Job:
    """The job ``rayflow run`` describes: exactly one agent and exactly one decomposition."""
    from rayflow.errors import ConfigError
    from rayflow.swarm.job import AgentRef, FileGlob, Job, TaskList

    if (agent_shell is None) == (agent_python is None):
        raise ConfigError("give exactly one of --agent-shell and --agent-python")
    if (tasks is None) == (glob is None):
        raise ConfigError("give exactly one of --tasks and --glob")
    if glob is not None and repo is None:
        raise ConfigError("--glob needs --repo (the directory it matches in)")
    agent = (
        AgentRef.shell(agent_shell, timeout_s=agent_timeout_s)
        if agent_shell is not None
        else AgentRef.python(str(agent_python), timeout_s=agent_timeout_s)
    )
    decomposition = TaskList(_load_tasks(tasks)) if tasks is not None else FileGlob(str(repo), str(glob))
    return Job(
        agent,
        decomposition,
        name=name,
        tenant=tenant,
        memory=memory,
        memory_namespaces=namespaces,
        backend=backend,
        workers=workers,
        upload=str(upload) if upload is not None else (str(repo) if repo is not None else None),
    )


@app.command("run")
def run(
    agent_shell: Optional[str] = typer.Option(
        None, "--agent-shell", help="Shell command run per subtask (the task arrives as JSON on stdin)."
    ),
    agent_python: Optional[str] = typer.Option(
        None, "--agent-python", help="'module:function' called per subtask with an AgentContext."
    ),
    tasks: Optional[Path] = typer.Option(None, "--tasks", help="JSON file: a list of task objects."),
    glob: Optional[str] = typer.Option(None, "--glob", help="One subtask per file of --repo matching this."),
    repo: Optional[Path] = typer.Option(None, "--repo", help="Repository the glob matches in (also uploaded)."),
    upload: Optional[Path] = typer.Option(
        None, "--upload", help="Directory copied into every sandbox (default: --repo)."
    ),
    name: str = typer.Option("", "--name", help="Job name (default: generated)."),
    workers: int = typer.Option(4, min=1, help="Sandboxed workers at once."),
    backend: str = typer.Option("auto", help="Sandbox backend: auto, docker, local or process."),
    memory: bool = typer.Option(True, help="Give agents a hub token (memory on)."),
    namespace: list[str] = typer.Option(
        [], "--namespace", "-n", help="Extra memory namespace pattern agents may use (repeatable; 'ns/*')."
    ),
    tenant: str = TenantOption,
    agent_timeout_s: float = typer.Option(600.0, "--agent-timeout-s", help="Limit of one subtask's agent run."),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (default: $RAY_ADDRESS or local)."),
    timeline: Optional[Path] = typer.Option(None, "--timeline", help="Save the run's timeline as this PNG."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Save the whole result as JSON here."),
    max_rows: int = typer.Option(50, min=4, help="Rows of the result table at most."),
    progress: bool = typer.Option(True, help="Show live progress bars."),
) -> None:
    """Run one swarm job on a Ray cluster and print its result table."""
    job = job_from_options(
        agent_shell=agent_shell,
        agent_python=agent_python,
        tasks=tasks,
        glob=glob,
        repo=repo,
        upload=upload,
        name=name,
        workers=workers,
        backend=backend,
        memory=memory,
        namespaces=tuple(namespace),
        tenant=tenant,
        agent_timeout_s=agent_timeout_s,
    )
    import rayflow
    from rayflow.api import Swarm

    rayflow.init(address, log_to_driver=False, logging_level="WARNING")
    result = Swarm().run(job, progress=progress)
    console.print(result.table(max_rows=max_rows))
    if result.report:
        console.print(result.report, markup=False, highlight=False)
    if timeline is not None:
        console.print(f"timeline: {result.timeline().plot(timeline)}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(result.to_json())
        console.print(f"result: {json_out}")
    if not result.ok:
        raise typer.Exit(1)


def main() -> None:
    """Entry point: typed errors become a one-line message and exit code 2, never a traceback."""
    try:
        app(standalone_mode=False)
    except RayflowError as exc:
        err_console.print(f"[red]error[/] {escape(f'[{exc.code}]')} {escape(exc.message)}")
        sys.exit(2)
    except (typer.Exit, typer.Abort) as exc:
        sys.exit(getattr(exc, "exit_code", 1))
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise
