"""Schedules as data: the two sides of a bridge issue their collectives in one order, and an
expert rank queues each micro-batch's experts right before its send."""
import pytest

from masep.parallel.schedule import EXPERTS, RECV, SEND, comm_sequence, separated_schedule


@pytest.mark.parametrize("layers", [1, 3])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_expert_ops_follow_the_attention_collectives(layers, m):
    attention = separated_schedule("attention", layers, m)
    expert = separated_schedule("expert", layers, m)
    assert comm_sequence(attention) == comm_sequence(expert)
    position = {(op.kind, op.layer, op.mb): i for i, op in enumerate(expert)}
    assert len(position) == len(expert) == 3 * layers * m  # each (kind, layer, mb) once
    for layer in range(layers):
        for mb in range(m):
            recv, run, send = (position[k, layer, mb] for k in (RECV, EXPERTS, SEND))
            # the computation follows its receive and sits right before its send: nothing else
            # (another micro-batch's experts above all) is queued on the compute stream before
            # the send's launch, so the outputs leave as soon as they exist
            assert recv < run and send == run + 1
