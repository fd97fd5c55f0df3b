"""What MaTTS knows about the demo's fixing agent, named from the host side.

The fixer (:mod:`rayflow.guest.agents.fixer`) runs in a sandbox and the host never imports it, so
everything the host needs to know about it is written down here as plain names:

* its target, and the reviser that steers its sequential refinement
  (:func:`rayflow.guest.agents.matts_refine.untried_strategies_first`: it ignores feedback, but
  trying the strategies no attempt has tried yet makes it explore);
* the task field that orders its repair strategies (``strategy_order``), which parallel rollouts
  rotate so they start their search in different places;
* where its value reports the failure (``signature``, ``signature_id``), the repairs it
  ``tried`` (each a ``strategy`` with its ``edit``) and the ``strategy`` that fixed it;
* the tags and content line its memory lookup reads back (``strategy:``, ``sig:``, ``Edit: ``),
  and ``failed:`` for the strategies that failed, which that lookup never takes as suggestions.

``tests/unit/test_fixer_profile.py`` loads both sides and checks that they agree.
"""

from __future__ import annotations

from rayflow.swarm.job import Matts, MattsAgentProfile

#: The demo's fixing agent, run in each sandbox.
FIXER = "rayflow.guest.agents.fixer:fix_module"

FIXER_PROFILE = MattsAgentProfile(
    reviser="rayflow.guest.agents.matts_refine:untried_strategies_first",
    order_field="strategy_order",
    tries_field="tried",
    try_name_key="strategy",
    try_edit_key="edit",
    tried_summary_field="tried_strategies",
    chosen_field="strategy",
    signature_field="signature",
    signature_id_field="signature_id",
    approaches_noun="strategies",
    chosen_tag="strategy:",
    signature_tag="sig:",
    failed_tag="failed:",
    edit_prefix="Edit: ",
)


def fixer_matts(mode: str = "parallel", *, k: int = 3, r: int = 3) -> Matts:
    """MaTTS settings for a job of the fixing agent: ``Job(AgentRef.python(FIXER), ..., matts=fixer_matts())``."""
    return Matts(mode, k=k, r=r, profile=FIXER_PROFILE)
