"""The sandbox wall: what both sides of it share, and nothing else.

Everything here is imported by the host (sandbox backends, the swarm, the hub) *and* shipped into
every sandbox image next to :mod:`rayflow.guest`, so it follows the guest's rules: the standard
library, msgpack and aioquic only, no other rayflow package. What lives here:

* the formats that cross the wall: length-prefixed framing (``framing``), the host <-> runtime
  channel messages (``channel``), the tar format of uploaded trees (``archive``), the command
  lines that start guest programs (``guest_commands``);
* the hub's RPC as its clients speak it: frames (``rpc_frames``), the sans-IO connection state
  (``rpc_protocol``), the asyncio client (``rpc_client``), the op table (``hub_ops``) and the form
  of its argument schemas (``op_schema``), the records and their wire forms (``memory_records``,
  ``hub_records``), the typed client (``hub_client``) and where a hub is (``hub_endpoint``);
* the swarm's records that subtasks hand back (``subtasks``, ``result_counts``) and the pure steps
  the coordinator runs on either side (``globbing``, ``synthesis``: pattern B runs them in a
  sandbox, pattern A on the host);
* the few stdlib-only helpers both sides need (``procfs``, ``targets``).
"""
