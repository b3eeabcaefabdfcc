"""Plain autograd + hook implementations, used only as test oracles."""
import torch
import torch.nn.functional as F


def saliency(model, x, target):
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    score = out.gather(1, target[:, None]).sum()
    return torch.autograd.grad(score, x)[0]


def layer_act_grad(model, layer, x, target):
    """Activation of ``layer`` (a module) and d score / d activation, with a forward hook."""
    store = {}

    def hook(module, args, output):
        store["a"] = output
    handle = layer.register_forward_hook(hook)
    try:
        out = model(x)
    finally:
        handle.remove()
    score = out.gather(1, target[:, None]).sum()
    return store["a"], torch.autograd.grad(score, store["a"])[0]


def grad_cam(model, layer, x, target, relu=True, upsample=True):
    act, grad = layer_act_grad(model, layer, x, target)
    cam = (grad.mean(dim=(2, 3), keepdim=True) * act).sum(1, keepdim=True)
    cam = cam.clamp_min(0) if relu else cam
    return F.interpolate(cam, size=x.shape[2:], mode="bilinear", align_corners=False) if upsample else cam
