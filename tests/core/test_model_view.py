"""The model view (issue 16): what a ``model_fn`` may carry besides being callable (``core.types.ModelView``),
the accessors that read it (``None`` or empty defaults for a plain function), and the one wrapper
(``core.model.Wrapped``) that keeps the inner view and changes only the call, in its four uses: fullgrad's
input tap, smooth's layer noise, the generation logits model, and the dataset runner's observer."""
import functools
import threading

import pytest
import torch
from torch import nn

import torchex_fn as tx
from torchex_fn.composite.generation import _logits_model
from torchex_fn.core.capture import layer_gradients, layer_shapes
from torchex_fn.core.model import FunctionalModel, Wrapped
from torchex_fn.core.types import (ModelView, aliases_of, layer_name_of, layer_names_of, lock_of, memo_owner_of,
                                   module_of, output_of, view_of)
from torchex_fn.methods.cam import _INPUT, _tap_input
from torchex_fn.methods.gradient import _layer_noise

pytestmark = pytest.mark.usefixtures("one_thread")

# What ModelView declares: its attributes and its methods.
MEMBERS = ("module", "output", "lock", "aliases", "memo_owner", "layer_names", "name_of")


def tiny_cnn():
    torch.manual_seed(0)
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 4, 3, padding=1))
    net.add_module("bn", nn.BatchNorm2d(4))
    net.add_module("relu", nn.ReLU())
    net.add_module("features", nn.Conv2d(4, 4, 3, padding=1))
    net.add_module("relu2", nn.ReLU())
    net.add_module("pool", nn.AdaptiveAvgPool2d(1))
    net.add_module("flat", nn.Flatten())
    net.add_module("fc", nn.Linear(4, 3))
    return net.eval()


class TiedLM(nn.Module):
    """Token ids -> logits [B, T, vocab], the output head tied to the embedding (as GPT-2's lm_head)."""

    def __init__(self, vocab=7, dim=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(torch.cumsum(self.emb(ids), dim=1))), "extra"


def plain(params, x):
    return x.flatten(1) @ params["w"]


def images(batch=2):
    return torch.randn(batch, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def test_protocol_declares_the_members_functional_model_has_them():
    declared = set(ModelView.__annotations__) | {"layer_names", "name_of"}
    assert declared == set(MEMBERS)
    net = tiny_cnn()
    fn, _ = tx.functionalize(net, output=0)
    assert all(hasattr(fn, m) for m in MEMBERS)
    assert not any(hasattr(plain, m) for m in MEMBERS)


def test_accessors_on_a_functional_model():
    net = tiny_cnn()
    fn, _ = tx.functionalize(net, output="logits")
    assert view_of(fn) is fn and module_of(fn) is net and output_of(fn) == "logits"
    assert lock_of(fn) is tx.functionalize(net)[0].lock            # one lock per module, shared
    assert isinstance(lock_of(fn), type(threading.RLock()))
    assert layer_names_of(fn) == dict(net.named_modules())
    assert layer_name_of(fn, net.features) == "features"
    assert layer_name_of(fn, nn.ReLU()) is None                     # not part of it
    assert memo_owner_of(fn) is net and aliases_of(fn) == ()
    lm = TiedLM()
    assert aliases_of(tx.functionalize(lm)[0]) == (("head.weight", "emb.weight"),)


def test_accessors_on_a_plain_function_give_defaults():
    assert view_of(plain) is None and module_of(plain) is None
    assert output_of(plain) is None and lock_of(plain) is None and aliases_of(plain) == ()
    assert layer_names_of(plain) is None and layer_name_of(plain, nn.ReLU()) is None
    assert memo_owner_of(plain) is plain

    class NotAModule:   # a `module` that is not an nn.Module is no view
        module = "net"
    assert module_of(NotAModule()) is None and view_of(NotAModule()) is None


def test_wrapped_keeps_the_inner_view():
    net = tiny_cnn()
    fn, params = tx.functionalize(net, output=0)
    wrapped = Wrapped(fn, after=lambda x, out: out * 2)
    assert isinstance(wrapped, FunctionalModel)          # a wrapper of a FunctionalModel is one
    assert view_of(wrapped) is wrapped and module_of(wrapped) is net and output_of(wrapped) == 0
    assert lock_of(wrapped) is lock_of(fn) and aliases_of(wrapped) == aliases_of(fn)
    assert layer_names_of(wrapped) == layer_names_of(fn)
    assert layer_name_of(wrapped, net.fc) == "fc" and layer_name_of(wrapped, nn.ReLU()) is None
    assert memo_owner_of(wrapped) is net
    assert output_of(Wrapped(fn, output=None)) is None   # an override of the output choice
    twice = Wrapped(wrapped, before=lambda x: x)
    assert module_of(twice) is net and memo_owner_of(twice) is net and lock_of(twice) is lock_of(fn)

    lm = TiedLM()
    lm_fn, _ = tx.functionalize(lm)
    assert aliases_of(Wrapped(lm_fn)) == (("head.weight", "emb.weight"),)


def test_wrapped_plain_function_knows_no_module():
    wrapped = Wrapped(plain, after=lambda x, out: out)
    assert not isinstance(wrapped, FunctionalModel)
    assert view_of(wrapped) is None and module_of(wrapped) is None and lock_of(wrapped) is None
    assert layer_names_of(wrapped) is None and output_of(wrapped) is None
    assert memo_owner_of(wrapped) is plain and memo_owner_of(Wrapped(wrapped)) is plain
    with pytest.raises(TypeError, match="Wrapped: expected a model_fn that knows its module"):
        Wrapped(plain, hook=("conv", lambda m, a, o: o))
    with pytest.raises(TypeError, match="Wrapped: expected model_fn, a pure"):
        Wrapped(tiny_cnn())


def test_wrapped_changes_only_the_call():
    net = tiny_cnn()
    fn, params = tx.functionalize(net)
    x = images()
    seen = []
    wrapped = Wrapped(fn, before=lambda x: x * 0.5, after=lambda x, out: seen.append(x) or out + 1)
    torch.testing.assert_close(wrapped(params, x), fn(params, x * 0.5) + 1, rtol=0, atol=0)
    assert seen[0] is x                                   # after sees the input the wrapper was given
    p = {"w": torch.ones(3 * 6 * 6, 2)}
    assert torch.equal(Wrapped(plain, after=lambda x, out: -out)(p, x), -plain(p, x))


def test_layer_shape_memo_stays_keyed_by_the_users_model():
    net = tiny_cnn()
    fn, params = tx.functionalize(net)
    x = images()
    layer_shapes(Wrapped(fn), params, x, ("features",), "test")   # a short-lived wrapper fills the memo
    calls = []
    hook = net.features.register_forward_hook(lambda *a: calls.append(1))
    try:
        layer_shapes(fn, params, x, ("features",), "test")     # the model itself finds it: no forward
    finally:
        hook.remove()
    assert calls == []


def _held_elsewhere(lock) -> bool:
    """Whether ``lock`` is held (by this thread): another thread cannot take it."""
    other = []
    t = threading.Thread(target=lambda: other.append(lock.acquire(blocking=False)) or (other[0] and lock.release()))
    t.start()
    t.join()
    return not other[0]


def test_hook_is_registered_under_the_lock_before_capture_hooks_and_is_removed():
    net = tiny_cnn()
    fn, params = tx.functionalize(net)
    x = images()
    held = []
    register = net.features.register_forward_hook

    def spy(hook):   # the registration itself happens under the model's lock
        held.append(_held_elsewhere(lock_of(fn)))
        return register(hook)
    net.features.register_forward_hook = spy
    try:
        wrapped = Wrapped(fn, hook=("features", lambda module, args, out: out + 1.0))
        out, act = tx.capture(wrapped, params, x, "features")
    finally:
        del net.features.register_forward_hook
    assert held == [True, True] and not _held_elsewhere(lock_of(fn))   # ours first, then capture's
    _, clean = tx.capture(fn, params, x, "features")
    torch.testing.assert_close(act, clean + 1.0, rtol=0, atol=0)   # capture saw the hooked output
    assert not any(m._forward_hooks for m in net.modules())
    with pytest.raises(RuntimeError, match="boom"):
        Wrapped(fn, hook=("features", lambda m, a, o: (_ for _ in ()).throw(RuntimeError("boom"))))(params, x)
    assert not any(m._forward_hooks for m in net.modules())        # removed when the call fails


# ------------------------------------------------------------------------------------ the four uses

def test_input_tap_gives_the_input_gradient():
    net = tiny_cnn()
    fn, params = tx.functionalize(net)
    x = images()
    result = layer_gradients(Wrapped(fn, before=_tap_input), params, x, 1, layers=[_INPUT, "features"])
    want = torch.func.grad(lambda x: fn(params, x)[:, 1].sum())(x)
    torch.testing.assert_close(result.grads[_INPUT], want)
    maps = tx.fullgrad(fn, params, x, 1)
    assert maps.shape == (2, 1, 6, 6) and bool((maps >= 0).all())


def test_layer_noise_adds_the_noise_to_one_layer():
    lm = TiedLM().eval()
    fn, params = tx.functionalize(lm, output=0)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    noisy = _layer_noise(fn, "emb", noise)
    assert module_of(noisy) is lm and output_of(noisy) == 0 and memo_owner_of(noisy) is lm
    want = lm.head(torch.tanh(torch.cumsum(lm.emb(ids) + noise, dim=1)))
    torch.testing.assert_close(noisy(params, ids)[0], want)
    torch.testing.assert_close(noisy(params, ids.repeat(2, 1))[0], want.repeat(2, 1, 1))   # r * n rows
    with pytest.raises(ValueError, match=r"smooth: expected layer 'emb' to output \[r \* 2, 3, 4\]"):
        noisy(params, ids[:1])
    assert not any(m._forward_hooks for m in lm.modules())
    last = lambda out: out[0][:, -1, 1]   # noqa: E731  (callable targets get the raw output)
    maps = tx.smooth(tx.saliency, samples=2, generator=torch.Generator().manual_seed(0))(fn, params, ids, last,
                                                                                          layer="emb")
    assert maps.shape == (2, 3, 4)


def test_logits_model_returns_the_logits_and_keeps_the_view():
    lm = TiedLM().eval()
    fn, params = tx.functionalize(lm, output=0)
    ids = torch.tensor([[1, 2, 3]])
    logits_fn = _logits_model(fn, "test")
    assert output_of(logits_fn) is None                       # targets index the logits it returns
    assert module_of(logits_fn) is lm and layer_name_of(logits_fn, lm.emb) == "emb"
    assert torch.equal(logits_fn(params, ids), fn(params, ids)[0])
    with pytest.raises(ValueError, match="test: expected a model output with logits"):
        _logits_model(tx.functionalize(lm)[0], "test")(params, ids)   # a tuple without output=
    res = tx.continuation_attribution(fn, params, ids, torch.tensor([[4, 5]]), layer="emb",
                                      method="input_x_gradient")
    assert res.token_attr.shape == (1, 2, 3)


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(10 + i)), i % 3


def test_runner_observer_keeps_functional_model_and_plain_functions(tmp_path):
    pytest.importorskip("captum")
    net = tiny_cnn()
    fn, params = tx.functionalize(net)
    data = Images()
    x = torch.stack([data[i][0] for i in range(6)])
    t = torch.tensor([data[i][1] for i in range(6)])
    # deeplift's captum backend needs a FunctionalModel: the runner's observer around one is one
    captum = functools.partial(tx.deeplift, backend="captum")
    store = tx.attribute_dataset(captum, fn, params, data, out=tmp_path / "a", batch_size=3, progress=False)
    want = torch.cat([captum(fn, params, x[i:i + 3], t[i:i + 3]) for i in (0, 3)])
    torch.testing.assert_close(store.maps[0:6], want)
    assert torch.equal(store.predictions, fn(params, x).argmax(1))

    # a plain function: the observer reports the method's own forward on the batch, so no extra one is made
    w = {"w": torch.randn(3 * 6 * 6, 3, generator=torch.Generator().manual_seed(3))}
    calls = []

    def counted(params, x):
        calls.append(x.shape[0])
        return plain(params, x)
    store = tx.attribute_dataset(tx.saliency, counted, w, data, out=tmp_path / "b", batch_size=3, progress=False)
    assert calls == [3, 3]
    assert torch.equal(store.predictions, plain(w, x).argmax(1))
    torch.testing.assert_close(store.maps[0:6], tx.saliency(plain, w, x, t))
