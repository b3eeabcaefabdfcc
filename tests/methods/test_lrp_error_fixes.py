"""Every fix that lrp's errors suggest works (issue 22, item 4), followed by machine on a timm ViT and a small BERT.

From each starting call, every fix an error message names (``composite='attnlrp'`` / ``'cp_lrp'``,
``layer='<name>'``, ``rules={'<name>': 'epsilon'}``) is applied and the call made again, up to three fixes deep:
each then runs, or stops with a different error that names a module of the model (``name (Type)``) and whose own
fixes are followed in turn. At least one path from every start ends in a map.
"""
import re

import pytest
import torch
from torch import nn

import torchex_fn as tx

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")

FIXES = [
    (re.compile(r"composite='(attnlrp|cp_lrp)'"), lambda m: {"composite": m.group(1)}),
    (re.compile(r"composite='attnlrp' or '(cp_lrp)'"), lambda m: {"composite": m.group(1)}),
    (re.compile(r"layer='([\w.]+)'"), lambda m: {"layer": m.group(1)}),
    (re.compile(r"rules=\{'([\w.]+)': '(\w+)'\}"), lambda m: {"rules": {m.group(1): m.group(2)}}),
]


def suggested(message):
    """The lrp options an error message tells the user to pass."""
    fixes = []
    for pattern, option in FIXES:
        for match in pattern.finditer(message):
            fix = option(match)
            if fix not in fixes:
                fixes.append(fix)
    return fixes


def named_modules(message, model):
    """The module types of ``model`` that ``message`` names as ``(Type)``."""
    kinds = {type(m).__name__ for m in model.modules()}
    return [k for k in re.findall(r"\((\w+)\)", message) if k in kinds]


def follow(model, fn, params, x, options, trail, depth=3):
    """Call lrp; on an error follow every fix it suggests. Returns the number of paths that ended in a map."""
    try:
        maps = tx.lrp(fn, params, x, 1, **options)
    except (TypeError, ValueError, NotImplementedError) as err:
        message = str(err)
        assert message.startswith("lrp: "), (trail, message)
        fixes = suggested(message)
        if trail:  # a fix was followed: a different error, one that names a module or says how to go on
            assert message != trail[-1][1], (trail, message)
            assert named_modules(message, model) or fixes, (trail, message)
        assert depth > 0, (trail, message)
        done = 0
        for fix in fixes:
            if any(options.get(k) == v for k, v in fix.items()):
                continue  # already applied: the message restates it
            done += follow(model, fn, params, x, {**options, **fix}, trail + [(fix, message)], depth - 1)
        return done
    assert torch.isfinite(maps).all(), trail
    return 1


def vit():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=1,
                              num_classes=5).eval()
    return model, torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    return model, torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("start", [{}, {"composite": "epsilon_plus"}, {"composite": "epsilon_gamma_box", "low": -1.0,
                                                                        "high": 1.0}])
def test_vit_every_suggested_fix_works(start):
    model, x = vit()
    fn, params = tx.functionalize(model)
    assert follow(model, fn, params, x, start, []) >= 2  # attnlrp and cp_lrp


@pytest.mark.parametrize("entry", ["ids", "dict"])
@pytest.mark.parametrize("start", [{}, {"composite": "attnlrp"}])
def test_bert_every_suggested_fix_works(entry, start):
    model, ids = bert()
    fn, params = tx.functionalize(model, output=lambda o: o.logits)
    x = ids if entry == "ids" else {"input_ids": ids}
    assert follow(model, fn, params, x, start, []) >= 1


def test_a_rule_for_a_layer_norm_names_the_module_and_the_composite_that_works():
    # the trap: rules={name: 'epsilon'} for a LayerNorm used to pass and end in "'mul' ..." naming nothing
    model, x = vit()
    fn, params = tx.functionalize(model)
    with pytest.raises(ValueError, match=r"got rule 'epsilon' for module 'blocks.0.norm1' \(LayerNorm\)\. .*"
                                         r"composite='attnlrp'"):
        tx.lrp(fn, params, x, 1, rules={"blocks.0.norm1": "epsilon"})
    with pytest.raises(ValueError, match=r"for module 'blocks.0.norm1' \(LayerNorm\)"):
        tx.lrp(fn, params, x, 1, rules={nn.LayerNorm: "epsilon"})
    with pytest.raises(NotImplementedError) as err:
        tx.lrp(fn, params, x, 1)
    assert "rules={" not in str(err.value)  # no layer norm takes a zennit rule: only the composite is suggested
    assert follow(model, fn, params, x, {"composite": "attnlrp"}, []) == 1


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_an_operation_without_a_rule_names_its_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), Square(), nn.Linear(4, 2)).eval()
    fn, params = tx.functionalize(net)
    x = torch.rand(2, 4)
    with pytest.raises(NotImplementedError, match=r"got 'mul' on an input-dependent tensor in module 1 \(Square\)\. "
                                                  r".*composite='attnlrp'"):
        tx.lrp(fn, params, x, 1)
    assert follow(net, fn, params, x, {}, []) >= 1
    with pytest.raises(NotImplementedError, match=r"'mul' on an input-dependent tensor outside every module of the "
                                                  r"model"):
        tx.lrp(lambda p, v: fn(p, v * v), params, x, 1)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())  # the diagnosis left none


def test_a_custom_linear_module_gets_the_rules_hint_and_it_works():
    class Dense(nn.Module):  # a linear layer of its own kind: a 2-D weight through F.linear
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 4))

        def forward(self, x):
            return torch.nn.functional.linear(x, self.weight)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Dense()).eval()
    fn, params = tx.functionalize(net)
    x = torch.rand(2, 4)
    with pytest.raises(NotImplementedError, match=r"2 \(Dense\).*rules=\{'2': 'epsilon'\}"):
        tx.lrp(fn, params, x, 1)
    want = tx.lrp(*tx.functionalize(nn.Sequential(net[0], net[1], _linear(net[2].weight))), x, 1)
    got = tx.lrp(fn, params, x, 1, rules={"2": "epsilon"})
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)  # the rule makes Dense an nn.Linear


def _linear(weight):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer
