"""continuation_attribution(checkpoint=True): how a checkpointed block runs its backward.

A checkpointed block keeps its inputs, runs again in the backward, and takes the product through it one
output token at a time when the backward is batched over ``batch_size`` tokens (its transient gradients
stay those of one backward); the recomputation replays the forward's random draws; blocks with several
differentiable inputs and structured outputs work as well as GPT-2's.
"""
import pytest
import torch
from torch import nn

import torchex_fn as tx

transformers = pytest.importorskip("transformers")

VOCAB = 50


def _gpt2(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                  attn_implementation="eager", bos_token_id=0, eos_token_id=0, initializer_range=0.1,
                                  resid_pdrop=dropout, attn_pdrop=dropout, embd_pdrop=dropout)
    return transformers.GPT2LMHeadModel(cfg).to(torch.float64)


def _ids(batch=2, n_in=5, n_out=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, n_in), generator=g), torch.randint(1, VOCAB, (batch, n_out), generator=g)


def _gap(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_a_batched_backward_runs_through_each_block_one_output_token_at_a_time():
    model = _gpt2().eval()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_out=4)
    widths = []

    def watch(module, args, output):   # in a recomputation (grad on): count the backward passes through the MLP
        if output.requires_grad:
            output.register_hook(lambda g: widths.append(tuple(g.shape)))
    handle = model.transformer.h[0].mlp.register_forward_hook(watch)
    try:
        got = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient", batch_size=3,
                                          checkpoint=True)
    finally:
        handle.remove()
    # chunks of 3 and 1 output tokens, one recomputation each: 3 + 1 single-token passes (a batched pass would
    # be one call for the chunk of 3), each of one token's width [B, T, D]
    assert widths == [(2, 9, 16)] * 4
    ref = tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient")
    assert _gap(got.token_attr, ref.token_attr) <= 1e-10
    assert _gap(got.seq_attr, ref.seq_attr) <= 1e-10


def test_the_recomputation_replays_the_forwards_dropout():
    model = _gpt2(dropout=0.3).train()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids()

    def run(**options):
        torch.manual_seed(5)
        return tx.continuation_attribution(fn, params, prompt, cont, method="input_x_gradient", **options).token_attr
    ref = run()                                        # torch.func.vjp: one forward, its masks in every backward
    for options in ({"batch_size": 3, "checkpoint": True}, {"batch_size": 1, "checkpoint": True}):
        assert _gap(run(**options), ref) <= 1e-10, options
    model.eval()
    assert _gap(run(), ref) > 1e-2                     # the dropout does change the maps


class _Block(nn.Module):
    """Two differentiable inputs (the stream and a gate computed from the embeddings), a keyword argument,
    and an output with a tensor that is not used later, an integer tensor and non-tensor leaves."""

    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 3 * d), nn.Linear(3 * d, d)

    def forward(self, h, gate, *, label=None):
        y = h + self.down(torch.tanh(self.up(h)) * gate)
        return y, {"norm": y.norm(), "step": torch.tensor(1), "label": label, "none": None}


class _Toy(nn.Module):
    def __init__(self, d=8, layers=3):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.blocks = nn.ModuleList([_Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        gate = torch.sigmoid(h.mean(-1, keepdim=True))
        for block in self.blocks:
            h, extra = block(h, gate, label="x")
            assert extra["step"].dtype == torch.int64 and extra["label"] == "x" and extra["none"] is None
        return self.head(h)


@pytest.mark.parametrize("method", ["input_x_gradient", "integrated_gradients"])
def test_blocks_with_several_inputs_and_structured_outputs(method):
    torch.manual_seed(0)
    model = _Toy().to(torch.float64).eval()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_in=6, n_out=5)
    options = {"method": method, "layer": "embed", "steps": 4, "baseline": 3}
    ref = tx.continuation_attribution(fn, params, prompt, cont, **options)
    assert ref.token_attr.abs().max() > 1e-3
    for batch_size in (None, 2, 1):
        got = tx.continuation_attribution(fn, params, prompt, cont, batch_size=batch_size, checkpoint=True, **options)
        assert _gap(got.token_attr, ref.token_attr) <= 1e-10, batch_size
        assert _gap(got.seq_attr, ref.seq_attr) <= 1e-10, batch_size
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_params_with_derivatives_are_refused_with_checkpointing():
    """The recomputation passes no derivative to the parameters: a clear error, before any forward; without
    checkpointing the maps differentiate in params."""
    model = _gpt2().eval()
    fn, params = tx.functionalize(model)
    prompt, cont = _ids(n_out=2)
    tracked = {k: v.detach().clone().requires_grad_(k == "transformer.h.0.mlp.c_fc.weight") for k, v in params.items()}
    with pytest.raises(ValueError, match=r"continuation_attribution: expected checkpoint=False when params carry"):
        tx.continuation_attribution(fn, tracked, prompt, cont, method="input_x_gradient", checkpoint=True)
    maps = tx.continuation_attribution(fn, tracked, prompt, cont, method="input_x_gradient").token_attr
    (g,) = torch.autograd.grad(maps.square().sum(), tracked["transformer.h.0.mlp.c_fc.weight"])
    assert g.abs().sum() > 0
