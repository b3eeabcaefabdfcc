"""Reference outputs of zennit-crp 0.6.0 for tests/methods/test_crp.py (run once, in a separate venv).

zennit-crp 0.6.0 requires zennit <= 0.4.6, which conflicts with the zennit 0.5.1 of the project's
environment, so its outputs are computed once here and the small tensors are committed::

    python3.11 -m venv /work/crpenv
    /work/crpenv/bin/pip install zennit-crp==0.6.0 "zennit==0.4.6" torch==2.14.1 torchvision==0.29.1
    /work/crpenv/bin/python tests/references/crp_reference.py    # writes tests/references/crp/*.pt

The models are torchvision's vgg11_bn and resnet18 with 10 classes, initialised from ``torch.manual_seed(0)``
with non-trivial batch-norm statistics drawn from a seeded generator (batch-norm ``eps = 0``, so that
zennit's merge of a batch norm into the preceding layer is the model itself, as in
tests/methods/test_lrp.py). The weights are not stored (vgg11_bn alone is 37 MB): the test rebuilds
the models from the same seed under the same torch version and checks the stored logits first.

Each file holds: the input ``x`` [2, 3, 32, 32] and ``target``, the ``logits``, and per layer the
relevance at the layer's output (``relevance/<layer>``, from ``CondAttribution`` with
``record_layer``), its per-channel sum (``channels/<layer>``, ``ChannelConcept().attribute(...,
abs_norm=False)``), and the conditional heatmaps (``heatmaps/<layer>``, ``[2, K, 3, 32, 32]``, the
input's gradient before zennit-crp sums it over colour channels) of the concepts ``concepts/<layer>``
(lists of channel ids; a list of several is one concept masking several channels), all with
zennit's ``EpsilonPlusFlat`` composite and the canonizers zennit-crp's documentation uses
(``SequentialMergeBatchNorm`` for VGG, ``ResNetCanonizer`` for ResNet).
"""
import sys
from pathlib import Path

import torch
import torchvision
from crp.attribution import CondAttribution
from crp.concepts import ChannelConcept
from torch import nn
from zennit.canonizers import SequentialMergeBatchNorm
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

OUT = Path(__file__).resolve().parent / "crp"

# arch -> {layer: concepts}
CASES = {
    "vgg11_bn": {"features.8": [[0], [5], [17], [3, 9, 100]], "features.15": [[1], [42], [511]]},
    "resnet18": {"layer2": [[0], [7], [64, 65]], "layer3.0.conv1": [[2], [30], [255]]},
}


def build(arch):
    """The model of the references (the test builds it the same way)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
                m.eps = 0.0
    return model


class FullHeatmap(CondAttribution):
    """zennit-crp's attribution with the input gradient kept per colour channel (not summed)."""

    def heatmap_modifier(self, data, on_device=None):
        return data.grad.detach().clone()


def main():
    torch.set_num_threads(1)
    OUT.mkdir(exist_ok=True)
    for arch, layers in CASES.items():
        model = build(arch)
        canonizer = ResNetCanonizer() if arch.startswith("resnet") else SequentialMergeBatchNorm()
        composite = EpsilonPlusFlat(canonizers=[canonizer])
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        target = torch.tensor([1, 3])
        with torch.no_grad():
            logits = model(x)
        record = {"x": x, "target": target, "logits": logits}
        attribution = FullHeatmap(model)
        data = x.clone().requires_grad_(True)
        conditions = [{"y": [int(t)]} for t in target]
        attr = attribution(data, conditions, composite, record_layer=list(layers))
        record["heatmap"] = attr.heatmap
        for layer, concepts in layers.items():
            record[f"relevance/{layer}"] = attr.relevances[layer]
            record[f"channels/{layer}"] = ChannelConcept().attribute(attr.relevances[layer], abs_norm=False)
            record[f"concepts/{layer}"] = concepts
            heatmaps = []
            for b in range(2):
                data = x[b:b + 1].clone().requires_grad_(True)
                conditions = [{layer: c, "y": [int(target[b])]} for c in concepts]
                heatmaps.append(attribution(data, conditions, composite).heatmap)   # [K, 3, 32, 32]
            record[f"heatmaps/{layer}"] = torch.stack(heatmaps)
        torch.save(record, OUT / f"{arch}.pt")
        print(arch, {k: tuple(v.shape) for k, v in record.items() if isinstance(v, torch.Tensor)}, file=sys.stderr)


if __name__ == "__main__":
    main()
