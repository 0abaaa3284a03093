"""Speculative decoding: proposers of draft tokens (n-gram prompt lookup, a draft model),
the rule that accepts them, and rejection sampling for drafts sampled from a draft model.

One step verifies a sequence's k drafts by feeding them after its last token: the
1 + k sample rows give the target's own token at every position, and the drafts
are accepted while they agree with it (``verify.num_accepted``). For a greedy row
that is argmax equality; for a random row the target's token is drawn from the
row's counter-based stream, so the same seed gives the same tokens with or
without speculation; a draft model's drafts at temperature > 0 are checked by
rejection sampling instead (``rejection.py``), which keeps the output
distribution exactly the target's.
"""
