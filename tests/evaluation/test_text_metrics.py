"""tx.metrics text metrics: token F1 / IoU and AUPRC against rationales (closed forms, sklearn parity), AOPC
comprehensiveness and sufficiency on a hand-weighted bag-of-tokens classifier (closed forms)."""
import math

import pytest
import torch

from torchex_fn import metrics

RATIONALE = torch.tensor([[1, 1, 0, 0, 0, 0]], dtype=torch.bool)


def test_token_f1_and_iou_closed_forms():
    perfect = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.2, 0.3]])
    half = torch.tensor([[0.9, 0.0, 0.8, 0.0, 0.2, 0.3]])        # top 2: tokens 0, 2
    one = torch.ones(1)
    torch.testing.assert_close(metrics.token_f1(perfect, RATIONALE), one)
    torch.testing.assert_close(metrics.token_iou(perfect, RATIONALE), one)
    torch.testing.assert_close(metrics.token_f1(half, RATIONALE), one / 2)
    torch.testing.assert_close(metrics.token_iou(half, RATIONALE), one / 3)        # 1 of {0, 1, 2}
    # k = 3 on the perfect map: P = {0, 1, 5}: F1 = 2 * 2 / 5, IoU = 2 / 3
    torch.testing.assert_close(metrics.token_f1(perfect, RATIONALE, k=3), one * 0.8)
    torch.testing.assert_close(metrics.token_iou(perfect, RATIONALE, k=3), one * 2 / 3)
    # abs ranks -0.95 first; a mask that hides tokens 2..5 leaves P = top 2 of {0, 1}
    signed = torch.tensor([[0.9, 0.1, -0.95, 0.5, 0.0, 0.0]])
    torch.testing.assert_close(metrics.token_f1(signed, RATIONALE, abs=True), one / 2)
    real = torch.tensor([[1, 1, 0, 0, 0, 0]])
    torch.testing.assert_close(metrics.token_f1(signed, RATIONALE, mask=real), one)
    # constant map: ties in token order, the first two tokens
    torch.testing.assert_close(metrics.token_f1(torch.zeros(1, 6), RATIONALE), one)
    torch.testing.assert_close(metrics.token_f1(torch.zeros(1, 6), RATIONALE.flip(1)), 0 * one)


def test_auprc_closed_forms():
    one = torch.ones(1, dtype=torch.float64)
    perfect = torch.tensor([[0.9, 0.8, 0.1, 0.0, 0.2, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(metrics.auprc(perfect, RATIONALE), one)
    # ranked: token 0 (hit, P = 1), 5, 4, 2 ... token 1 last (hit at rank 6, P = 2 / 6): (1 + 1 / 3) / 2
    late = torch.tensor([[0.9, -1.0, 0.1, 0.0, 0.2, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(metrics.auprc(late, RATIONALE), one * (1 + 1 / 3) / 2)
    # a constant map: one threshold, precision = 2 / 6
    torch.testing.assert_close(metrics.auprc(torch.zeros(1, 6, dtype=torch.float64), RATIONALE), one / 3)
    assert metrics.auprc(perfect, torch.zeros(1, 6, dtype=torch.bool)).isnan().all()


def test_auprc_equals_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (6, 20), generator=gen).to(torch.float64)       # many ties
    scores[:3] += torch.rand(3, 20, generator=gen, dtype=torch.float64)           # and none
    truth = torch.rand(6, 20, generator=gen) > 0.6
    lengths = [20, 20, 15, 20, 12, 20]
    mask = torch.arange(20)[None] < torch.tensor(lengths)[:, None]
    ours = metrics.auprc(scores, truth, mask=mask)
    for i, n in enumerate(lengths):
        expected = sklearn_metrics.average_precision_score(truth[i, :n].numpy(), scores[i, :n].numpy())
        assert math.isclose(ours[i].item(), expected, rel_tol=1e-12), i


# a bag-of-tokens classifier: class 1's logit is the sum of per-token weights, class 0's is 0
TOKEN_WEIGHT = torch.tensor([0.0, 3.0, 2.0, 1.0, 0.5, -1.0], dtype=torch.float64)     # id 0 = [MASK], 5 = pad


def bag(params, ids):
    logit = params["w"][ids].sum(dim=1)
    return torch.stack([torch.zeros_like(logit), logit], dim=1)


PARAMS = {"w": TOKEN_WEIGHT}
IDS = torch.tensor([[1, 4, 2, 3, 4, 4, 4, 4, 4, 4]])                                   # logit 3 + 2 + 1 + 7 * 0.5


def probability(logit):
    return torch.sigmoid(torch.tensor(logit, dtype=torch.float64))


def test_aopc_comprehensiveness_closed_form():
    scores = TOKEN_WEIGHT[IDS]                                    # the exact contributions: a perfect ranking
    result = metrics.aopc_comprehensiveness(bag, PARAMS, IDS, scores, 1, reference_token_id=0,
                                            fractions=(0.1, 0.25, 0.3))       # k = floor(f * 10): 1, 2, 3
    full = probability(9.5)
    expected = torch.stack([full - probability(6.5), full - probability(4.5), full - probability(3.5)])
    torch.testing.assert_close(result.drop[0], expected)
    torch.testing.assert_close(result.aopc, expected.mean()[None])
    torch.testing.assert_close(result.fraction, torch.tensor([0.1, 0.25, 0.3], dtype=torch.float64))
    reversed_ = metrics.aopc_comprehensiveness(bag, PARAMS, IDS, -scores, 1, reference_token_id=0,
                                               fractions=(0.1, 0.2, 0.3))
    assert (reversed_.aopc < result.aopc).all()
    logits = metrics.aopc_comprehensiveness(bag, PARAMS, IDS, scores, 1, reference_token_id=0, fractions=(0.2,),
                                            probabilities=False)
    torch.testing.assert_close(logits.aopc, torch.tensor([5.0], dtype=torch.float64))  # 3 + 2 removed


def test_aopc_sufficiency_closed_form_with_padding():
    ids = torch.tensor([[1, 4, 2, 3, 4, 5, 5, 5]])                 # 5 real tokens, 3 pads (weight -1 each)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    scores = TOKEN_WEIGHT[ids].clone()
    scores[0, 5:] = 100.0                                          # padding never counts, whatever its score
    result = metrics.aopc_sufficiency(bag, PARAMS, ids, scores, 1, reference_token_id=0, fractions=(0.2, 0.4, 1.0),
                                      mask=mask, probabilities=False)
    # k = 1, 2, 5 of 5 real tokens: kept logits 3, 5, 7 (less 3 for the pads, which stay) of 7 - 3
    torch.testing.assert_close(result.drop[0], torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64))
    comp = metrics.aopc_comprehensiveness(bag, PARAMS, ids, scores, 1, reference_token_id=0, fractions=(0.2,),
                                          mask=mask, probabilities=False)
    torch.testing.assert_close(comp.drop[0], torch.tensor([3.0], dtype=torch.float64))


def test_aopc_is_differentiable_in_params():
    w = TOKEN_WEIGHT.clone().requires_grad_()
    scores = TOKEN_WEIGHT[IDS]
    assert torch.autograd.gradcheck(
        lambda w: metrics.aopc_comprehensiveness(bag, {"w": w}, IDS, scores, 1, reference_token_id=0).aopc, (w,))


def test_bad_arguments():
    scores = torch.rand(1, 10)
    with pytest.raises(TypeError, match="aopc_comprehensiveness: expected input_ids, an integer tensor"):
        metrics.aopc_comprehensiveness(bag, PARAMS, IDS.float(), scores, 1, reference_token_id=0)
    with pytest.raises(ValueError, match=r"aopc_sufficiency: expected attribution of shape \[1, 10\]"):
        metrics.aopc_sufficiency(bag, PARAMS, IDS, torch.rand(1, 10, 4), 1, reference_token_id=0)
    with pytest.raises(ValueError, match="aopc_sufficiency: expected fractions"):
        metrics.aopc_sufficiency(bag, PARAMS, IDS, scores, 1, reference_token_id=0, fractions=(0.0, 0.5))
    with pytest.raises(TypeError, match="aopc_sufficiency: expected reference_token_id"):
        metrics.aopc_sufficiency(bag, PARAMS, IDS, scores, 1, reference_token_id=None)
    with pytest.raises(ValueError, match=r"token_f1: expected rationale of shape \[1, 6\]"):
        metrics.token_f1(torch.rand(1, 6), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="auprc: expected attribution, a floating-point tensor"):
        metrics.auprc(torch.ones(1, 6, dtype=torch.long), RATIONALE)
