"""``tx.influence``: training-data influence equals captum 0.9.0's classes on a small trained MLP, and the
closed forms of a linear model with squared loss.

The MLP (6 -> 16 -> tanh -> 3) is trained by SGD for 240 steps on 96 generated examples (float64, so that
the exact Hessian of ``naive_influence_function`` inverts without float32 noise); four checkpoints are
saved under ``tmp_path`` with their learning rates (0.2, 0.2, 0.1, 0.05). captum loads them into its own
copy of the model (its ``checkpoints_load_func`` writes into the module); ours reads the same files.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torchex_fn as tx

captum_influence = pytest.importorskip("captum.influence")
from captum.influence._utils.nearest_neighbors import NearestNeighbors  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore::UserWarning:captum.*")]   # captum's own warnings

N_TRAIN, N_TEST = 96, 10
LRS = (0.2, 0.2, 0.1, 0.05)


def _ce_sum():
    return nn.CrossEntropyLoss(reduction="sum")


CE = nn.CrossEntropyLoss(reduction="none")


def _rel(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Exact(NearestNeighbors):
    """captum's TracInCPFastRandProj asks a nearest-neighbour index (annoy by default, not installed): an exact
    largest-dot-product one."""

    def setup(self, data):
        self.data = data

    def get_nearest_neighbors(self, query, k):
        top = torch.topk(query @ self.data.T, k, dim=1)
        return top.indices, top.values


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, x_train, y_train, x_test, y_test, paths); each file holds {"params": state_dict, "lr": lr}."""
    torch.manual_seed(0)
    x = torch.randn(N_TRAIN + N_TEST, 6, dtype=torch.float64)
    w = torch.randn(6, 3, dtype=torch.float64)
    y = (x @ w + 0.5 * torch.randn(N_TRAIN + N_TEST, 3, dtype=torch.float64)).argmax(1)
    model = _MLP().double()
    folder = tmp_path_factory.mktemp("ckpts")
    threads = torch.get_num_threads()                # a module fixture runs before the one_thread fixture
    torch.set_num_threads(1)
    paths, step = [], 0
    for epoch, lr in enumerate(LRS):
        for _ in range(5):                           # 5 epochs of 12 steps per checkpoint: 240 steps in all
            for i in range(0, N_TRAIN, 8):           # plain SGD by hand (torch.optim's first use costs seconds)
                grads = torch.autograd.grad(nn.functional.cross_entropy(model(x[i:i + 8]), y[i:i + 8]),
                                            list(model.parameters()))
                with torch.no_grad():
                    for p, g in zip(model.parameters(), grads):
                        p -= lr * g
                step += 1
        path = folder / f"ckpt{epoch}.pt"
        torch.save({"params": copy.deepcopy(model.state_dict()), "lr": lr}, path)
        paths.append(str(path))
    torch.set_num_threads(threads)
    assert step == 240
    return model.eval(), x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], paths


def _ours_load(path):
    state = torch.load(path, weights_only=True)
    return state["params"], state["lr"]


def _captum_load(model, path):
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["params"])
    return state["lr"]


def _fn(model):
    fn, _ = tx.functionalize(copy.deepcopy(model))
    return fn


@pytest.mark.parametrize("layers", [None, ["fc2"]])
def test_tracin_cp_equals_captum(trained, layers):
    """Scores [10, 96], self-influence [96] and the top-3 proponents / opponents equal captum's TracInCP
    (sample-wise gradients, CrossEntropyLoss(reduction='sum')) to 1e-4 relative (measured ~1e-15 in float64)."""
    model, x, y, xt, yt, paths = trained
    theirs = captum_influence.TracInCP(copy.deepcopy(model), TensorDataset(x, y), paths, _captum_load,
                                       layers=layers, loss_fn=_ce_sum(), batch_size=32,
                                       sample_wise_grads_per_batch=True)
    fn = _fn(model)
    ours = tx.influence.tracin_cp(fn, paths, (x, y), (xt, yt), loss_fn=CE, layers=layers, load=_ours_load,
                                  batch_size=20)
    ref = theirs.influence((xt, yt))
    assert ours.shape == (N_TEST, N_TRAIN) and _rel(ours, ref) < 1e-4
    assert _rel(tx.influence.tracin_cp(fn, paths, (x, y), loss_fn=CE, layers=layers, load=_ours_load),
                theirs.self_influence()) < 1e-4
    for proponents in (True, False):
        top = tx.influence.tracin_cp(fn, paths, (x, y), (xt, yt), loss_fn=CE, layers=layers, load=_ours_load,
                                     k=3, proponents=proponents, batch_size=7)
        ref_top = theirs.influence((xt, yt), k=3, proponents=proponents)
        assert torch.equal(top.indices, ref_top.indices)
        assert _rel(top.scores, ref_top.influence_scores) < 1e-4


def test_tracin_cp_batch_norm_buffers_left_out(tmp_path):
    """With batch norm (eval mode, running statistics set), the default differentiates the parameters only,
    as captum's model.parameters() does (the loss depends on running_mean too): scores equal TracInCP's
    (sample_wise_grads_per_batch=False, a backward per example) to 1e-4 relative. captum's sample-wise
    gradients skip the batch norm's weight and bias without a word (they cover Linear and Conv2d only): they
    equal ours with layers= the two linear layers. The checkpoints are whole state dicts (num_batches_tracked,
    an int64 buffer, included)."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double().eval()
    paths = []
    for i in range(2):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn_like(p))
            net[1].running_mean.copy_(torch.randn(8))
            net[1].running_var.copy_(torch.rand(8) + 0.5)
        paths.append(str(tmp_path / f"bn{i}.pt"))
        torch.save({"params": copy.deepcopy(net.state_dict()), "lr": 0.1 * (i + 1)}, paths[-1])
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    xt, yt = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    loop = captum_influence.TracInCP(copy.deepcopy(net), TensorDataset(x, y), paths, _captum_load,
                                     loss_fn=CE, batch_size=16)
    fn, _ = tx.functionalize(copy.deepcopy(net))
    ours = tx.influence.tracin_cp(fn, paths, (x, y), (xt, yt), loss_fn=CE, load=_ours_load, batch_size=16)
    assert _rel(ours, loop.influence((xt, yt))) < 1e-4
    sample_wise = captum_influence.TracInCP(copy.deepcopy(net), TensorDataset(x, y), paths, _captum_load,
                                            loss_fn=_ce_sum(), batch_size=16, sample_wise_grads_per_batch=True)
    linear = tx.influence.tracin_cp(fn, paths, (x, y), (xt, yt), loss_fn=CE, load=_ours_load, layers=["0", "3"])
    assert _rel(linear, sample_wise.influence((xt, yt))) < 1e-4
    assert _rel(ours, linear) > 1e-2                  # the batch norm's parameters count


def test_tracin_cp_data_forms_and_checkpoint_forms(trained):
    """A Dataset, a DataLoader, params dicts with learning_rates=, and paths read by the default loader
    (a "learning_rate" entry) all give the scores of (x, y) tensors with load=, bit for bit or to 1e-12."""
    model, x, y, xt, yt, paths = trained
    fn = _fn(model)
    ref = tx.influence.tracin_cp(fn, paths, (x, y), (xt, yt), loss_fn=CE, load=_ours_load)
    dicts = [_ours_load(p)[0] for p in paths]
    by_dicts = tx.influence.tracin_cp(fn, dicts, TensorDataset(x, y), (xt, yt), loss_fn=CE, learning_rates=LRS,
                                      batch_size=13)
    by_loader = tx.influence.tracin_cp(fn, dicts, DataLoader(TensorDataset(x, y), batch_size=50), (xt, yt),
                                       loss_fn=CE, learning_rates=list(LRS))
    for i, p in enumerate(paths):
        torch.save({**dicts[i], "learning_rate": LRS[i]}, p + ".flat")
    by_default = tx.influence.tracin_cp(fn, [p + ".flat" for p in paths], (x, y), (xt, yt), loss_fn=CE)
    for other in (by_dicts, by_loader, by_default):
        assert _rel(other, ref) < 1e-12
    # without learning rates, every checkpoint weighs 1
    ones = tx.influence.tracin_cp(fn, dicts, (x, y), (xt, yt), loss_fn=CE)
    parts = [tx.influence.tracin_cp(fn, [d], (x, y), (xt, yt), loss_fn=CE) for d in dicts]
    assert _rel(ones, sum(parts)) < 1e-12
    assert _rel(ref, sum(lr * p for lr, p in zip(LRS, parts))) < 1e-12


def test_tracin_cp_fast_equals_captum(trained):
    """TracInCPFast (the last layer's weight, outer-product trick): scores, top-3 and self-influence to 1e-4
    relative; and the same as tracin_cp on fc2.weight alone (the reference by explicit gradients)."""
    model, x, y, xt, yt, paths = trained
    theirs = captum_influence.TracInCPFast(copy.deepcopy(model), "fc2", TensorDataset(x, y), paths, _captum_load,
                                           loss_fn=_ce_sum(), batch_size=32)
    fn = _fn(model)
    ours = tx.influence.tracin_cp_fast(fn, paths, (x, y), (xt, yt), layer="fc2", loss_fn=CE, load=_ours_load)
    assert _rel(ours, theirs.influence((xt, yt))) < 1e-4
    assert _rel(ours, tx.influence.tracin_cp(fn, paths, (x, y), (xt, yt), loss_fn=CE, layers=["fc2.weight"],
                                             load=_ours_load)) < 1e-10
    top = tx.influence.tracin_cp_fast(fn, paths, (x, y), (xt, yt), layer="fc2", loss_fn=CE, load=_ours_load,
                                      k=4, proponents=False)
    ref_top = theirs.influence((xt, yt), k=4, proponents=False)
    assert torch.equal(top.indices, ref_top.indices) and _rel(top.scores, ref_top.influence_scores) < 1e-4
    mine = tx.influence.tracin_cp_fast(fn, paths, (x, y), layer="fc2", loss_fn=CE, load=_ours_load)
    assert _rel(mine, theirs.self_influence()) < 1e-4


def test_tracin_cp_fast_rand_proj_equals_captum_under_the_same_draws(trained):
    """captum draws its two projections from the global generator after torch.manual_seed(seed); ours from
    generator= seeded alike, after the one int64 draw by which captum's DataLoader iterator (opened before the
    projections are drawn) advances the global generator: the same matrices, so the scores and the top-3
    agree to 1e-4 relative. Without projection the scores are tracin_cp_fast's; self-influence is the vectors' squared norm, which equals
    the diagonal of the test-vs-train scores of the training set on itself."""
    model, x, y, xt, yt, paths = trained
    fn = _fn(model)
    theirs = captum_influence.TracInCPFastRandProj(copy.deepcopy(model), "fc2", TensorDataset(x, y), paths,
                                                   _captum_load, loss_fn=_ce_sum(), batch_size=32,
                                                   nearest_neighbors=_Exact(), projection_dim=16, seed=3)
    gen = torch.Generator().manual_seed(3)
    torch.empty((), dtype=torch.int64).random_(generator=gen)   # captum's DataLoader iterator draws its seed first
    ours = tx.influence.tracin_cp_fast_rand_proj(fn, paths, (x, y), (xt, yt), layer="fc2", loss_fn=CE,
                                                 load=_ours_load, projection_dim=16, generator=gen)
    ref = theirs.influence((xt, yt), k=None)
    assert _rel(ours, ref) < 1e-4
    exact = tx.influence.tracin_cp_fast(fn, paths, (x, y), (xt, yt), layer="fc2", loss_fn=CE, load=_ours_load)
    assert _rel(ours, exact) > 1e-3                  # the projection changed the scores: it was applied
    gen = torch.Generator().manual_seed(3)
    torch.empty((), dtype=torch.int64).random_(generator=gen)
    top = tx.influence.tracin_cp_fast_rand_proj(fn, paths, (x, y), (xt, yt), layer="fc2", loss_fn=CE,
                                                load=_ours_load, projection_dim=16, generator=gen, k=3)
    ref_top = theirs.influence((xt, yt), k=3)
    assert torch.equal(top.indices, ref_top.indices) and _rel(top.scores, ref_top.influence_scores) < 1e-4
    plain = tx.influence.tracin_cp_fast_rand_proj(fn, paths, (x, y), (xt, yt), layer="fc2", loss_fn=CE,
                                                  load=_ours_load)
    assert _rel(plain, exact) < 1e-10
    g = torch.Generator().manual_seed(5)
    selfs = tx.influence.tracin_cp_fast_rand_proj(fn, paths, (x, y), layer="fc2", loss_fn=CE, load=_ours_load,
                                                  projection_dim=16, generator=g)
    square = tx.influence.tracin_cp_fast_rand_proj(fn, paths, (x, y), (x, y), layer="fc2", loss_fn=CE,
                                                   load=_ours_load, projection_dim=16,
                                                   generator=torch.Generator().manual_seed(5))
    assert _rel(selfs, square.diagonal()) < 1e-12


def test_similarity_influence_equals_captum(trained, tmp_path):
    """Cosine (largest) and euclidean (smallest) top-5 at two layers equal captum's SimilarityInfluence to 1e-4
    relative, same indices; the full [10, 96] matrix is the reference computed here."""
    model, x, y, xt, yt, paths = trained
    fn, params = tx.functionalize(copy.deepcopy(model))
    for metric, direction in (("cosine", "max"), ("euclidean", "min")):
        sim = getattr(captum_influence._core.similarity_influence, f"{metric}_similarity"
                      if metric == "cosine" else "euclidean_distance")
        theirs = captum_influence.SimilarityInfluence(copy.deepcopy(model), ["fc1", "act"], TensorDataset(x),
                                                      str(tmp_path / metric), similarity_metric=sim,
                                                      similarity_direction=direction, batch_size=32)
        ref = theirs.influence(xt, top_k=5)
        ours = tx.influence.similarity_influence(fn, params, xt, x, layer=["fc1", "act"], similarity=metric, k=5,
                                                 batch_size=17)
        for name, top in zip(["fc1", "act"], ours):
            assert torch.equal(top.indices, ref[name][0])
            assert _rel(top.scores, ref[name][1]) < 1e-4
    full = tx.influence.similarity_influence(fn, params, xt, (x, y), layer={"h": "act"}, k=None)["h"]
    a_t, a = torch.tanh(model.fc1(xt)).detach(), torch.tanh(model.fc1(x)).detach()
    expected = (a_t / a_t.norm(dim=1, keepdim=True)) @ (a / a.norm(dim=1, keepdim=True)).T
    assert _rel(full, expected) < 1e-12


def test_similarity_influence_one_layer_where_captum_crashes(trained, tmp_path):
    """captum's SimilarityInfluence with one layer wraps the one layer's activations (already a list) in a
    list a second time and its similarity metric fails on the list; ours returns that layer's TopK, the same
    as the layer's entry of a two-layer call."""
    model, x, y, xt, yt, paths = trained
    theirs = captum_influence.SimilarityInfluence(copy.deepcopy(model), "fc1", TensorDataset(x), str(tmp_path),
                                                  batch_size=32)
    with pytest.raises(AttributeError, match="'list' object has no attribute 'view'"):   # [[acts]] in its metric
        theirs.influence(xt, top_k=2)
    fn, params = tx.functionalize(copy.deepcopy(model))
    one = tx.influence.similarity_influence(fn, params, xt, x, layer="fc1", k=2)
    two = tx.influence.similarity_influence(fn, params, xt, x, layer=["fc1", "act"], k=2)[0]
    assert torch.equal(one.indices, two.indices) and torch.equal(one.scores, two.scores)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")   # inside captum
def test_naive_influence_function_equals_captum(trained):
    """NaiveInfluenceFunction on fc2 (51 params, the Hessian summed over the training set, hessian_reg 1e-3,
    every eigenvalue kept): scores, self-influence and top-3 to 1e-4 relative; and g_t^T (H + 1e-3 I)^-1 g
    with H = torch.func.hessian of the summed loss and explicit per-example gradients, computed here."""
    model, x, y, xt, yt, paths = trained
    theirs = captum_influence.NaiveInfluenceFunction(copy.deepcopy(model), TensorDataset(x, y), paths[-1],
                                                     _captum_load, layers=["fc2"], loss_fn=_ce_sum(),
                                                     batch_size=32, sample_wise_grads_per_batch=True,
                                                     projection_dim=51, hessian_reg=1e-3,
                                                     hessian_inverse_tol=1e-5)
    fn = _fn(model)
    params = _ours_load(paths[-1])[0]
    kw = dict(loss_fn=CE, layers=["fc2"], damping=1e-3, batch_size=24)
    ours = tx.influence.naive_influence_function(fn, params, (x, y), (xt, yt), **kw)
    assert _rel(ours, theirs.influence((xt, yt))) < 1e-4
    assert _rel(tx.influence.naive_influence_function(fn, params, (x, y), **kw), theirs.self_influence()) < 1e-4
    top = tx.influence.naive_influence_function(fn, params, (x, y), (xt, yt), k=3, **kw)
    ref_top = theirs.influence((xt, yt), k=3)
    assert torch.equal(top.indices, ref_top.indices) and _rel(top.scores, ref_top.influence_scores) < 1e-4

    names = ["fc2.weight", "fc2.bias"]

    def flat_loss(theta, xs, ys):
        w, b = theta[:48].reshape(3, 16), theta[48:]
        return nn.functional.cross_entropy(torch.tanh(xs @ params["fc1.weight"].T + params["fc1.bias"]) @ w.T + b,
                                           ys, reduction="sum")

    theta = torch.cat([params[n].reshape(-1) for n in names])
    H = torch.func.hessian(flat_loss)(theta, x, y) + 1e-3 * torch.eye(51, dtype=torch.float64)
    g = torch.stack([torch.func.grad(flat_loss)(theta, x[i:i + 1], y[i:i + 1]) for i in range(N_TRAIN)])
    gt = torch.stack([torch.func.grad(flat_loss)(theta, xt[i:i + 1], yt[i:i + 1]) for i in range(N_TEST)])
    assert _rel(ours, gt @ torch.linalg.solve(H, g.T)) < 1e-8


def test_closed_form_linear_squared_loss():
    """f(x) = w.x (no bias), L = (f(x) - y)^2: grad = 2 r x with r = w.x - y, so TracIn's self-influence is
    sum_c lr_c * 4 r_c^2 |x|^2. Hand numbers: w = (1, 2) at lr 0.5 and w = (0, 1) at lr 1;
    x = (1, 1), y = 0 -> r = 3 and 1, |x|^2 = 2 -> 0.5*4*9*2 + 1*4*1*2 = 44;
    x = (2, 0), y = 1 -> r = 1 and -1, |x|^2 = 4 -> 0.5*4*1*4 + 1*4*1*4 = 24;
    x = (0, -1), y = -2 -> r = 0 and -1, |x|^2 = 1 -> 0 + 4 = 4.
    tracin_cp_fast (the one linear layer's weight) gives the same; the scores between x0 and x1 are
    0.5 * (2*3)(2*1)(x0.x1 = 2) + 1 * (2*1)(2*-1)(2) = 12 - 8 = 4. The influence function with damping 0 on
    the data set: H = sum 2 x x^T at w = (1, 2)."""
    net = nn.Linear(2, 1, bias=False).double()
    fn, _ = tx.functionalize(net)
    x = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64)
    ckpts = [{"weight": torch.tensor([[1.0, 2.0]], dtype=torch.float64)},
             {"weight": torch.tensor([[0.0, 1.0]], dtype=torch.float64)}]

    def sq(out, target):
        return (out.squeeze(-1) - target) ** 2

    expected = torch.tensor([44.0, 24.0, 4.0], dtype=torch.float64)
    for f in (tx.influence.tracin_cp, tx.influence.tracin_cp_fast):
        extra = {"layer": ""} if f is tx.influence.tracin_cp_fast else {}   # "": the model itself
        selfs = f(fn, ckpts, (x, y), loss_fn=sq, learning_rates=[0.5, 1.0], **extra)
        torch.testing.assert_close(selfs, expected, rtol=0, atol=1e-12)
        scores = f(fn, ckpts, (x, y), (x[:1], y[:1]), loss_fn=sq, learning_rates=[0.5, 1.0], **extra)
        assert scores[0, 1].item() == pytest.approx(4.0, abs=1e-12)
        torch.testing.assert_close(scores[0, 0], expected[0], rtol=0, atol=1e-12)
    H = 2 * x.T @ x                                            # [[10, 2], [2, 4]], det 36
    w = ckpts[0]
    r = x @ w["weight"][0] - y                                 # (3, 1, 0)
    g = 2 * r[:, None] * x
    inv = torch.tensor([[4.0, -2.0], [-2.0, 10.0]], dtype=torch.float64) / 36
    torch.testing.assert_close(torch.linalg.inv(H), inv)
    ours = tx.influence.naive_influence_function(fn, w, (x, y), (x, y), loss_fn=sq, damping=0.0)
    torch.testing.assert_close(ours, g @ inv @ g.T, rtol=1e-12, atol=1e-12)
    # the first example: g = (6, 6), g^T H^-1 g = 36 * (4 - 2 - 2 + 10) / 36 = 10
    assert ours[0, 0].item() == pytest.approx(10.0, abs=1e-12)


def test_model_untouched_and_no_hook_left(trained):
    model, x, y, xt, yt, paths = trained
    net = copy.deepcopy(model)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fn, _ = tx.functionalize(net)
    tx.influence.tracin_cp_fast(fn, paths, (x, y), (xt, yt), layer=net.fc2, loss_fn=CE, load=_ours_load)
    tx.influence.tracin_cp(fn, paths, (x, y), loss_fn=CE, load=_ours_load, progress=True)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in net.modules())


def test_bad_input(trained):
    model, x, y, xt, yt, paths = trained
    fn = _fn(model)
    with pytest.raises(TypeError, match=r"influence.tracin_cp.*checkpoints, a list"):
        tx.influence.tracin_cp(fn, _ours_load(paths[0])[0], (x, y), loss_fn=CE)
    with pytest.raises(ValueError, match=r"influence.tracin_cp.*learning_rates"):
        tx.influence.tracin_cp(fn, paths, (x, y), loss_fn=CE, load=_ours_load, learning_rates=[1.0])
    with pytest.raises(ValueError, match=r"influence.tracin_cp.*one row per example"):
        tx.influence.tracin_cp(fn, paths, (x, y[:5]), loss_fn=CE, load=_ours_load)
    with pytest.raises(TypeError, match=r"influence.tracin_cp.*pair \(x, y\)"):
        tx.influence.tracin_cp(fn, paths, x, loss_fn=CE, load=_ours_load)
    with pytest.raises(ValueError, match=r"influence.tracin_cp.*layer.*fc3"):
        tx.influence.tracin_cp(fn, paths, (x, y), loss_fn=CE, load=_ours_load, layers=["fc3"])
    for f in (tx.influence.tracin_cp, tx.influence.tracin_cp_fast):
        with pytest.raises(ValueError, match=rf"{f.__name__}.*one loss per example"):
            f(fn, paths, (x, y), loss_fn=lambda o, t: o.sum(), load=_ours_load,
              **({"layer": "fc2"} if f is tx.influence.tracin_cp_fast else {}))
    with pytest.raises(ValueError, match=r"influence.tracin_cp_fast.*last layer"):
        tx.influence.tracin_cp_fast(fn, paths, (x, y), layer="fc1", loss_fn=CE, load=_ours_load)
    with pytest.raises(ValueError, match=r"influence.tracin_cp.*k <= the number of training examples"):
        tx.influence.tracin_cp(fn, paths, (x[:4], y[:4]), (xt, yt), loss_fn=CE, load=_ours_load, k=5)
    with pytest.raises(ValueError, match=r"influence.similarity_influence.*similarity"):
        tx.influence.similarity_influence(fn, _ours_load(paths[0])[0], xt, x, layer="fc1", similarity="dot")
    with pytest.raises(ValueError, match=r"influence.naive_influence_function.*damping"):
        tx.influence.naive_influence_function(fn, _ours_load(paths[0])[0], (x, y), loss_fn=CE, damping=-1.0)
