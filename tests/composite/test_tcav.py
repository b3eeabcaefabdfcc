"""tx.concepts.cav / tcav / ttest: concept activation vectors and TCAV (Kim et al., ICML 2018).

* cav: recovers a planted direction on an identity layer (cosine > 0.99, accuracy 1), is deterministic given a
  generator, and its logistic regression is at the optimum (gradient of the penalised loss ~ 0);
* tcav: closed form on a hand-weighted ReLU network (directional derivatives = (relu'(h) * w2[t]) . v);
  equal to captum 0.9's TCAV (sign_count, magnitude) given the same CAVs (a tiny classifier returns them)
  on a small MLP and on a randomly initialised resnet18, to 1e-5; captum's "magnitude" is the mean
  directional derivative, not the ratio its docstring states;
* ttest: equal to scipy.stats.ttest_ind (statistic, two-sided p) and its incomplete beta to scipy.special.betainc;
* vmap over an ensemble == the loop; bad input is refused by name; the model keeps no hook.
"""
import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.composite import tcav as tcav_module
from support.parity import assert_no_hooks, assert_parity, peer_input, peer_model

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:captum.*")]


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3)).eval()


def _randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------- cav

def test_cav_recovers_a_planted_direction_and_is_deterministic():
    model = nn.Sequential(nn.Identity(), nn.Linear(5, 2)).eval()   # layer "0": the input itself
    fn, params = tx.functionalize(model)
    direction = torch.tensor([1.0, -2.0, 0.0, 2.0, 0.5])
    unit = direction / direction.norm()
    random_x = _randn(60, 5, seed=2) * 0.3
    concept_x = _randn(60, 5, seed=3) * 0.3 + 2.0 * unit
    g = torch.Generator().manual_seed(7)
    result = tx.concepts.cav(fn, params, concept_x, random_x, layer="0", generator=g)
    assert result.vector.shape == (5,)
    torch.testing.assert_close(result.vector.norm(), torch.tensor(1.0))
    assert float(result.vector @ unit) > 0.99            # points towards the concept
    assert float(result.accuracy) == 1.0
    again = tx.concepts.cav(fn, params, concept_x, random_x, layer="0", generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.vector, result.vector) and torch.equal(again.accuracy, result.accuracy)
    other = tx.concepts.cav(fn, params, concept_x, random_x, layer="0", generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other.vector, result.vector)  # another split, another fit
    swapped = tx.concepts.cav(fn, params, random_x, concept_x, layer="0", generator=torch.Generator().manual_seed(7))
    assert float(swapped.vector @ unit) < -0.99


def test_cav_accuracy_is_measured_on_the_held_out_split():
    """Labels that no layer can separate (the same points twice): the held-out accuracy is what the fitted
    classifier gets on the held-out examples, recomputed here from the split the generator draws."""
    model = nn.Sequential(nn.Identity(), nn.Linear(3, 2)).eval()
    fn, params = tx.functionalize(model)
    concept_x = _randn(10, 3, seed=4)
    random_x = _randn(10, 3, seed=5) + 0.5
    result = tx.concepts.cav(fn, params, concept_x, random_x, layer="0", generator=torch.Generator().manual_seed(0),
                             test_fraction=0.5)
    features = torch.cat([concept_x, random_x]).double()
    labels = torch.cat([torch.ones(10), torch.zeros(10)]).double()
    order = torch.randperm(20, generator=torch.Generator().manual_seed(0))
    test, train = order[:10], order[10:]
    w, b = tcav_module._fit_logistic(features[train], labels[train], 0.01, 200)
    expected = (((features[test] @ w + b) > 0).double() == labels[test]).double().mean()
    torch.testing.assert_close(result.accuracy, expected.float())
    torch.testing.assert_close(result.vector, (w / w.norm()).float())


def test_the_logistic_regression_is_at_its_optimum():
    features = _randn(30, 4, seed=6).double()
    labels = (features[:, 0] + 0.5 * _randn(30, seed=7).double() > 0).double()
    w, b = tcav_module._fit_logistic(features, labels, 0.1, 200)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    signs = 2 * labels - 1
    loss = nn.functional.softplus(-signs * (features @ w + b)).mean() + 0.05 * (w @ w)
    gw, gb = torch.autograd.grad(loss, (w, b))
    assert gw.abs().max() < 1e-8 and gb.abs() < 1e-8
    assert w.norm() > 0.1                                  # not the trivial point


# ---------------------------------------------------------------------------------------------- tcav

def test_tcav_closed_form_on_a_hand_weighted_relu_network():
    """out = W2 relu(W1 x): at layer "0" (the pre-activation h) the gradient of class t is relu'(h) * W2[t], so
    the directional derivative along v is (1[h > 0] * W2[t]) . v, for every example and CAV."""
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
        model[2].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 1.0], [-1.0, 1.0, 2.0, -0.5]]))
    fn, params = tx.functionalize(model)
    x = torch.tensor([[1.0, 1.0, 1.0], [1.0, -1.0, 2.0], [-1.0, -1.0, -1.0], [-2.0, 3.0, 0.5], [0.5, -0.2, -1.0]])
    cavs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.6, 0.0, 0.8], [0.5, 0.5, -0.5, 0.5]])
    result = tx.concepts.tcav(fn, params, x, 1, layer="0", cavs=cavs)
    h = x @ model[0].weight.T
    expected = ((h > 0).float() * model[2].weight[1]) @ cavs.T
    torch.testing.assert_close(result.derivatives, expected)
    torch.testing.assert_close(result.score, (expected > 0).float().mean(0))
    torch.testing.assert_close(result.mean_derivative, expected.mean(0))
    torch.testing.assert_close(result.magnitude, expected.clamp_min(0).sum(0) / expected.abs().sum(0))
    # by hand for the first CAV (the first unit): W2[1, 0] = -1 where h_0 = x_0 > 0
    torch.testing.assert_close(result.derivatives[:, 0], torch.tensor([-1.0, -1.0, 0.0, 0.0, -1.0]))
    assert result.score[0] == 0 and result.random_score is None and result.p_value is None


def test_tcav_p_value_is_the_ttest_of_the_scores():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _randn(16, 6)
    concept_cavs = torch.nn.functional.normalize(_randn(5, 12, seed=3) + 2.0, dim=1)
    random_cavs = torch.nn.functional.normalize(_randn(6, 12, seed=4), dim=1)
    result = tx.concepts.tcav(fn, params, x, 0, layer="2", cavs=concept_cavs, random_cavs=random_cavs)
    alone = tx.concepts.tcav(fn, params, x, 0, layer="2", cavs=random_cavs)
    torch.testing.assert_close(result.random_score, alone.score)
    test = tx.concepts.ttest(result.score, alone.score)
    torch.testing.assert_close(result.t_statistic, test.statistic)
    torch.testing.assert_close(result.p_value, test.p_value)
    assert result.random_score.unique().numel() > 1        # not a degenerate test


# ----------------------------------------------------------------------------------------- captum

class _GivenCAVs:
    """A captum Classifier that trains nothing: it returns the CAVs it was given, one per training call."""

    def __init__(self, vectors):
        self.vectors = list(vectors)
        self.current = None
        self.ids = None

    def train_and_eval(self, dataloader, **kwargs):
        self.current = self.vectors.pop(0).reshape(-1)
        self.ids = torch.cat([labels for _, labels in dataloader]).unique().tolist()   # [concept's, random's]
        return {"accs": torch.tensor(1.0)}

    def weights(self):
        return torch.stack([self.current, -self.current])   # rows in the order of classes(): concept, random

    def classes(self):
        return self.ids


def _captum_tcav(model, layer, x, target, cav_vectors, concept_examples, tmp_path):
    concept_mod = pytest.importorskip("captum.concept")
    from captum.concept._utils.classifier import Classifier

    classifier = type("GivenCAVs", (_GivenCAVs, Classifier), {})(cav_vectors)
    concept = concept_mod.Concept(0, "concept", [concept_examples])
    randoms = [concept_mod.Concept(1 + k, f"random{k}", [concept_examples + k + 1]) for k in range(len(cav_vectors))]
    sets = [[concept, r] for r in randoms]
    tcav = concept_mod.TCAV(model, [layer], classifier=classifier, save_path=str(tmp_path))
    scores = tcav.interpret(x, sets, target=target)
    keys = [f"0-{1 + k}" for k in range(len(cav_vectors))]
    sign = torch.stack([scores[k][layer]["sign_count"][0] for k in keys])
    magnitude = torch.stack([scores[k][layer]["magnitude"][0] for k in keys])
    return sign, magnitude


def test_tcav_equals_captum_on_an_mlp_and_captum_magnitude_is_the_mean_derivative(tmp_path):
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _randn(20, 6)
    cavs = torch.nn.functional.normalize(_randn(4, 12, seed=5), dim=1)
    ours = tx.concepts.tcav(fn, params, x, 2, layer="2", cavs=cavs)
    sign, magnitude = _captum_tcav(model, "2", x, 2, cavs, _randn(4, 6, seed=9), tmp_path)
    assert_no_hooks(model)
    torch.testing.assert_close(ours.score, sign, rtol=0, atol=0)
    assert ours.score.unique().numel() > 1                 # the CAVs are told apart
    assert_parity(ours.mean_derivative, magnitude)
    # captum's docstring: magnitude = sum(|S| * [S > 0]) / sum(|S|); its code returns mean(S)
    documented = ours.derivatives.clamp_min(0).sum(0) / ours.derivatives.abs().sum(0)
    torch.testing.assert_close(ours.magnitude, documented)
    assert (magnitude - documented).abs().max() > 0.05
    torch.testing.assert_close(magnitude, ours.derivatives.mean(0), rtol=1e-5, atol=1e-7)


def test_tcav_equals_captum_on_resnet18(tmp_path):
    model, fn, params = peer_model("resnet18")
    x = peer_input()
    layer = "layer3"
    concept_x = _randn(6, 3, 64, 64, seed=11) + 0.5
    random_x = _randn(6, 3, 64, 64, seed=12)
    cavs = torch.stack([tx.concepts.cav(fn, params, concept_x, random_x * s, layer=layer,
                                        generator=torch.Generator().manual_seed(s), test_fraction=0.0).vector
                        for s in (1, 2, 3)])
    assert cavs.shape == (3, 256, 4, 4)
    ours = tx.concepts.tcav(fn, params, x, 7, layer=layer, cavs=cavs)
    sign, magnitude = _captum_tcav(model, layer, x, 7, cavs, concept_x[:2], tmp_path)
    assert_no_hooks(model)
    torch.testing.assert_close(ours.score, sign, rtol=0, atol=0)
    assert_parity(ours.mean_derivative, magnitude)


# ---------------------------------------------------------------------------------------------- ttest

def test_ttest_equals_scipy():
    stats = pytest.importorskip("scipy.stats")
    special = pytest.importorskip("scipy.special")
    for seed, (na, nb, shift) in enumerate([(5, 7, 0.0), (10, 10, 0.3), (3, 40, 1.5), (50, 50, 0.05), (2, 2, 1.0)]):
        a = torch.rand(na, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + shift
        b = torch.rand(nb, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64)
        ours = tx.concepts.ttest(a, b)
        ref = stats.ttest_ind(a.numpy(), b.numpy())
        torch.testing.assert_close(ours.statistic.item(), float(ref.statistic), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(ours.p_value.item(), float(ref.pvalue), rtol=1e-9, atol=1e-15)
    grid = [(a, b, x) for a in (0.5, 1.0, 3.5, 40.0, 400.0) for b in (0.5, 2.0, 30.0) for x in (1e-4, 0.2, 0.5, 0.93)]
    a, b, x = (torch.tensor(v, dtype=torch.float64) for v in zip(*grid))
    reference = torch.from_numpy(special.betainc(a.numpy(), b.numpy(), x.numpy()))
    torch.testing.assert_close(tcav_module._betainc(a, b, x), reference, rtol=1e-9, atol=1e-14)


def test_ttest_edge_cases():
    same = torch.tensor([0.5, 0.5, 0.5])
    assert torch.isnan(tx.concepts.ttest(same, same).p_value)
    apart = tx.concepts.ttest(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 0.0]))
    assert apart.statistic == float("inf") and apart.p_value == 0
    equal_means = tx.concepts.ttest(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]))
    assert equal_means.statistic == 0 and equal_means.p_value == 1


# -------------------------------------------------------------------------------------- vmap, errors

def test_vmap_over_an_ensemble_equals_the_loop():
    models = [_mlp(seed=s) for s in range(3)]
    fn, _ = tx.functionalize(models[0])
    params, buffers = torch.func.stack_module_state(models)
    x = _randn(8, 6)
    cavs, randoms = _randn(3, 12, seed=2), _randn(4, 12, seed=3)

    def run(p):
        r = tx.concepts.tcav(fn, p, x, 1, layer="2", cavs=cavs, random_cavs=randoms)
        return r.score, r.mean_derivative, r.derivatives, r.p_value

    stacked = torch.func.vmap(run)({**params, **buffers})
    loop = [run(tx.functionalize(m)[1]) for m in models]
    for k, got in enumerate(stacked):
        torch.testing.assert_close(got, torch.stack([row[k] for row in loop]))


def test_bad_input_is_refused_by_name():
    model = _mlp()
    fn, params = tx.functionalize(model)
    x = _randn(4, 6)
    with pytest.raises(ValueError, match=r"concepts.tcav: expected cavs of the layer's activation shape \[K, 12\]"):
        tx.concepts.tcav(fn, params, x, 0, layer="2", cavs=torch.ones(2, 16))
    with pytest.raises(TypeError, match="concepts.tcav: expected cavs, a tensor"):
        tx.concepts.tcav(fn, params, x, 0, layer="2", cavs="stripes")
    with pytest.raises(ValueError, match="concepts.tcav: expected at least 2 cavs and 2 random_cavs"):
        tx.concepts.tcav(fn, params, x, 0, layer="2", cavs=torch.ones(2, 12), random_cavs=torch.ones(1, 12))
    with pytest.raises(TypeError, match="concepts.tcav: expected layer, one layer"):
        tx.concepts.tcav(fn, params, x, 0, layer=["2", "3"], cavs=torch.ones(2, 12))
    with pytest.raises(ValueError, match="concepts.tcav"):
        tx.concepts.tcav(fn, params, x, 0, layer="nope", cavs=torch.ones(2, 12))
    with pytest.raises(ValueError, match=r"concepts.cav: expected test_fraction in \[0, 1\)"):
        tx.concepts.cav(fn, params, x, x + 1, layer="2", test_fraction=1.0)
    with pytest.raises(ValueError, match="concepts.cav: expected random_x of the concept's example shape"):
        tx.concepts.cav(fn, params, x, torch.ones(4, 5), layer="2")
    with pytest.raises(TypeError, match="concepts.cav: expected concept_x of a floating-point dtype"):
        tx.concepts.cav(fn, params, x.long(), x, layer="2")
    with pytest.raises(ValueError, match="concepts.cav: expected weight_decay >= 0"):
        tx.concepts.cav(fn, params, x, x + 1, layer="2", weight_decay=-1.0)
    with pytest.raises(ValueError, match="concepts.cav: expected training examples of both"):
        tx.concepts.cav(fn, params, x[:1], x[:1] + 1, layer="2", test_fraction=0.5)
    with pytest.raises(ValueError, match="concepts.ttest: expected a, a 1-D tensor of at least 2 values"):
        tx.concepts.ttest(torch.ones(1), torch.ones(3))
    assert_no_hooks(model)
