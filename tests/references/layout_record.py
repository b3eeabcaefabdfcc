"""The layout record (issue 16): maps of every method on small seeded models, kept bit for bit.

Recorded once before the package was moved into core/, methods/, ... (torch 2.14.1, CPU) and compared with
``torch.equal`` by ``tests/test_layout_record.py`` after it: a move of code must not change one bit.

    python tests/references/layout_record.py      # rewrites layout_maps.pt (only when a change is meant)

Every case is self-contained here (models built from seeds, inputs drawn from generators), so the record
does not depend on any other test file.
"""
from __future__ import annotations

import os
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

import torchex_fn as tx

HERE = os.path.dirname(os.path.abspath(__file__))
RECORD = os.path.join(HERE, "layout_maps.pt")


class TinyCNN(nn.Module):
    def __init__(self, act: type = nn.ReLU, classes: int = 5, bn: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.act1 = act()
        self.features = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), act())
        if bn:
            self.features.add_module("2", nn.BatchNorm2d(6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        h = self.features(self.act1(self.conv1(x)))
        return self.fc(self.pool(h).flatten(1))


class Attention(nn.Module):
    """Tokens [B, N, D] -> logits, two self-attention layers through F.scaled_dot_product_attention."""

    def __init__(self, dim: int = 8, heads: int = 2, layers: int = 2, classes: int = 3):
        super().__init__()
        self.heads = heads
        self.q = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.k = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.out = nn.Linear(dim, classes)

    def split(self, t):
        b, n, d = t.shape
        return t.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x):
        for q, k in zip(self.q, self.k):
            att = F.scaled_dot_product_attention(self.split(q(x)), self.split(k(x)), self.split(x))
            x = x + torch.tanh(att.transpose(1, 2).reshape(x.shape))
        return self.out(x[:, 0])


class Embedded(nn.Module):
    """Token ids [B, T] -> embedding -> MLP over the mean: for layer= on integer inputs."""

    def __init__(self, vocab: int = 11, dim: int = 6, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, classes))

    def forward(self, ids):
        return self.mlp(self.embed(ids).mean(1))


def _cnn(seed: int, dtype: torch.dtype, bn: bool) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCNN(nn.ReLU, bn=bn)
    if bn:
        with torch.no_grad():
            model.features[2].running_mean.uniform_(-0.5, 0.5)
            model.features[2].running_var.uniform_(0.5, 2.0)
    return model.to(dtype).eval()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(7)


def _grid_mask(x, split):
    cells = tuple(-(-n // c) for n, c in zip(x.shape[-2:], split))
    return tx.masks.grid(x.shape[-2:], cells)


def _image_methods(x: torch.Tensor) -> Dict[str, Callable]:
    baselines = torch.linspace(-0.5, 0.5, 2 * x[0].numel(), dtype=x.dtype).view(2, *x.shape[1:])
    return {
        "saliency": lambda f, p, t: tx.saliency(f, p, x, t),
        "saliency_abs": lambda f, p, t: tx.saliency(f, p, x, t, abs=True),
        "input_x_gradient": lambda f, p, t: tx.input_x_gradient(f, p, x, t),
        "saliency_layer": lambda f, p, t: tx.saliency(f, p, x, t, layer="conv1"),
        "cam": lambda f, p, t: tx.cam(f, p, x, t, layer="features"),
        "grad_cam": lambda f, p, t: tx.grad_cam(f, p, x, t, layer="features"),
        "grad_cam_two": lambda f, p, t: torch.stack(tx.grad_cam(f, p, x, t, layer=["conv1", "features"])),
        "grad_cam_small": lambda f, p, t: tx.grad_cam(f, p, x, t, layer="conv1", upsample=False, relu=False),
        "grad_cam_pp": lambda f, p, t: tx.grad_cam_pp(f, p, x, t, layer="features"),
        "score_cam": lambda f, p, t: tx.score_cam(f, p, x, t, layer="features", batch_size=8),
        "layer_cam": lambda f, p, t: tx.layer_cam(f, p, x, t, layer="features"),
        "xgrad_cam": lambda f, p, t: tx.xgrad_cam(f, p, x, t, layer="features"),
        "hires_cam": lambda f, p, t: tx.hires_cam(f, p, x, t, layer="features"),
        "eigen_cam": lambda f, p, t: tx.eigen_cam(f, p, x, t, layer="features"),
        "ablation_cam": lambda f, p, t: tx.ablation_cam(f, p, x, t, layer="features", batch_size=8),
        "fullgrad": lambda f, p, t: tx.fullgrad(f, p, x, t),
        "integrated_gradients": lambda f, p, t: tx.integrated_gradients(f, p, x, t, baseline=0.1, steps=8),
        "integrated_gradients_chunked": lambda f, p, t: tx.integrated_gradients(
            f, p, x, t, steps=5, method="riemann_trapezoid", batch_size=4),
        "integrated_gradients_layer": lambda f, p, t: tx.integrated_gradients(f, p, x, t, layer="conv1", steps=4),
        "smoothgrad": lambda f, p, t: tx.smooth(tx.saliency, samples=3, generator=_gen())(f, p, x, t),
        "vargrad_grad_cam": lambda f, p, t: tx.smooth(tx.grad_cam, samples=3, kind="vargrad", generator=_gen())(
            f, p, x, t, layer="features"),
        "occlusion": lambda f, p, t: tx.occlusion(f, p, x, t, window=(3, 4, 4), stride=2, batch_size=8),
        "guided_backprop": lambda f, p, t: tx.guided_backprop(f, p, x, t),
        "deeplift": lambda f, p, t: tx.deeplift(f, p, x, t, baseline=0.1),
        "deeplift_layer": lambda f, p, t: tx.deeplift(f, p, x, t, baseline=0.1, layer="conv1"),
        "deeplift_shap": lambda f, p, t: tx.deeplift_shap(f, p, x, t, baselines=baselines),
        "lrp": lambda f, p, t: tx.lrp(f, p, x, t, composite="epsilon_alpha2_beta1_flat"),
        "lrp_plus": lambda f, p, t: tx.lrp(f, p, x, t, composite="epsilon_plus"),
        "rise": lambda f, p, t: tx.rise(f, p, x, t, num_masks=24, cell_size=3, batch_size=16, generator=_gen()),
        "gradient_shap": lambda f, p, t: tx.gradient_shap(f, p, x, t, baselines=baselines, samples=3, stdev=0.1,
                                                          batch_size=6, generator=_gen()),
        "feature_ablation": lambda f, p, t: tx.feature_ablation(f, p, x, t, feature_mask=_grid_mask(x, (2, 4)),
                                                                baseline=0.1, batch_size=8),
        "shapley_values": lambda f, p, t: tx.shapley_values(f, p, x, t, feature_mask=_grid_mask(x, (2, 2)),
                                                            batch_size=8),
        "shapley_value_sampling": lambda f, p, t: tx.shapley_value_sampling(
            f, p, x, t, feature_mask=_grid_mask(x, (2, 4)), samples=2, batch_size=8, generator=_gen()),
        "kernel_shap": lambda f, p, t: tx.kernel_shap(f, p, x, t, feature_mask=_grid_mask(x, (2, 2)), samples=10,
                                                      batch_size=8, generator=_gen()),
        "lime": lambda f, p, t: tx.lime(f, p, x, t, feature_mask=_grid_mask(x, (2, 2)), samples=10, batch_size=8,
                                        generator=_gen()),
        "layer_gradients": lambda f, p, t: torch.cat([v.flatten() for v in _flat(
            tx.layer_gradients(f, p, x, t, layers=["features"]))]),
        "deletion": lambda f, p, t: list(tx.deletion(f, p, x, tx.saliency(f, p, x, t), t, step=16)),
        "infidelity": lambda f, p, t: tx.infidelity(f, p, x, tx.saliency(f, p, x, t), t, n_perturb_samples=4,
                                                    perturb_fn=_noise, generator=_gen()),
    }


def _noise(x, generator):
    noise = 0.1 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return noise, x - noise


def _flat(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flat(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat(v)]
    return []


def cases() -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a call that builds its model and inputs from seeds and returns one tensor."""
    out: Dict[str, Callable[[], torch.Tensor]] = {}
    for model_name, seed, dtype, bn, target in [("cnn_bn_f32", 0, torch.float32, True, "tensor"),
                                                ("cnn_f64", 1, torch.float64, False, None)]:
        g = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(2, 3, 8, 8, generator=g).to(dtype)

        def make(method, seed=seed, dtype=dtype, bn=bn, target=target):
            def run():
                model = _cnn(seed, dtype, bn)
                fn, params = tx.functionalize(model)
                t = torch.tensor([1, 3]) if target == "tensor" else target
                return method(fn, params, t)
            return run

        for name, method in _image_methods(x).items():
            out[f"{model_name}/{name}"] = make(method)

    def attention(method, **options):
        def run():
            torch.manual_seed(3)
            fn, params = tx.functionalize(Attention().eval())
            x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
            return method(fn, params, x, None, **options)
        return run

    out["attention/attention_rollout"] = attention(tx.attention_rollout, upsample=False)
    out["attention/grad_rollout"] = attention(tx.grad_rollout, upsample=False)
    out["attention/saliency"] = attention(tx.saliency)
    out["attention/deeplift"] = attention(tx.deeplift)
    out["attention/integrated_gradients"] = attention(tx.integrated_gradients, steps=4)

    def tokens(method, **options):
        def run():
            torch.manual_seed(5)
            fn, params = tx.functionalize(Embedded().eval())
            ids = torch.randint(1, 11, (2, 6), generator=torch.Generator().manual_seed(6))
            return method(fn, params, ids, 2, layer="embed", **options)
        return run

    out["tokens/saliency"] = tokens(tx.saliency)
    out["tokens/integrated_gradients"] = tokens(tx.integrated_gradients, steps=4)
    out["tokens/deeplift"] = tokens(tx.deeplift)

    def vit(method, **options):
        def run():
            import torchvision
            torch.manual_seed(8)
            m = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                     hidden_dim=16, mlp_dim=32, num_classes=5)
            nn.init.normal_(m.heads.head.weight, std=0.5)
            fn, params = tx.functionalize(m.eval())
            x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
            return method(fn, params, x, None, **options)
        return run

    blocks = ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]
    out["vit/attention_rollout"] = vit(tx.attention_rollout)
    out["vit/grad_rollout"] = vit(tx.grad_rollout)
    out["vit/legrad"] = vit(tx.legrad, blocks=blocks)
    out["vit/saliency"] = vit(tx.saliency)
    out["vit/deeplift"] = vit(tx.deeplift)
    out["vit/guided_backprop"] = vit(tx.guided_backprop)

    def gpt2(fn_, **options):
        def run():
            import transformers
            torch.manual_seed(10)
            cfg = transformers.GPT2Config(vocab_size=40, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                          attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                                          initializer_range=0.1)
            fn, params = tx.functionalize(transformers.GPT2LMHeadModel(cfg).eval(), output="logits")
            g = torch.Generator().manual_seed(11)
            prompt, cont = torch.randint(1, 40, (2, 6), generator=g), torch.randint(1, 40, (2, 3), generator=g)
            return fn_(fn, params, prompt, cont, **options)
        return run

    out["gpt2/continuation_ig"] = gpt2(tx.continuation_attribution, layer="transformer.wte", steps=4)
    out["gpt2/continuation_saliency"] = gpt2(tx.continuation_attribution, method="saliency",
                                             layer="transformer.wte")
    out["gpt2/continuation_ablation"] = gpt2(tx.continuation_ablation)
    return out


def compute() -> Dict[str, torch.Tensor]:
    result = {}
    for name, run in cases().items():
        try:
            value = run()
        except Exception as e:  # a case that does not run is not recorded, and the test then fails on it
            print(f"skip {name}: {type(e).__name__}: {e}")
            continue
        result[name] = torch.cat([t.detach().flatten() for t in _flat(value)])
    return result


if __name__ == "__main__":
    maps = compute()
    torch.save({"torch": str(torch.__version__), "maps": maps}, RECORD)
    print(f"{len(maps)} maps, {sum(t.numel() for t in maps.values())} numbers -> {RECORD}")
