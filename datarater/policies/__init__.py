"""Training policies (weighting, online filtering, per-epoch selection) behind one protocol."""
from datarater.policies import filtering, selection, weighting  # pylint: disable=unused-import  (registers)
from datarater.policies.base import (FIELDS, POLICIES, READS, SCHEMAS, SECTIONS, VALUATION,
                                     WHOLE_SPLIT, FromScores, Policy, PolicyContext,
                                     check_fields, check_inputs, defaults, make_policy,
                                     policy_schema, register_policy, start_policy,
                                     unread_fields, with_defaults)
