"""Pruning and int8 quantization of any family's network, and rebuilding the result on load:
plain PyTorch (and torchao), no Ray.

A compressed model is a model bundle like any other: its family's loader builds the network
from ``hparams`` and calls :func:`restore` (through ``bundle.build_module``), which redoes the
recorded steps before the weights load:

- ``shapes``: tensors that structured pruning made smaller (their modules are resized);
- ``quantize``: ``dynamic`` (``torch.ao`` int8 Linear/LSTM, weights saved as plain int8
  tensors with their scales), ``weight_only`` (torchao ``Int8WeightOnlyConfig``; its tensors
  load with ``weights_only=True``) or ``static`` (torchao's PT2E flow for x86: the saved
  weights are the calibrated, prepared graph's fp32 weights and observer statistics, converted
  to int8 and compiled when loaded, so the same bits come back).

Every file still loads with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import contextlib
import statistics
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

#: Module types whose weights are pruned (embeddings and norms are left whole).
PRUNABLE = (nn.Linear, nn.Conv2d, nn.LSTM)
#: Module types ``quantize_dynamic`` makes int8 (the only int8 route for an LSTM in torch 2.13).
DYNAMIC = {nn.Linear, nn.LSTM}
#: The prefix of a module's int8 tensors in a saved state (see :func:`pack_dynamic`).
INT8 = "int8."


# --- pruning ------------------------------------------------------------------------------


def prunable(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    """(module, parameter name, state-dict key) of every weight pruning may zero. A weight that
    two modules share (a GPT head tied to its embedding) is left whole."""
    shared = _shared_parameters(module)
    found = []
    for prefix, sub in module.named_modules():
        if not isinstance(sub, PRUNABLE):
            continue
        for name, param in sub.named_parameters(recurse=False):
            if name.startswith("weight") and id(param) not in shared:
                found.append((sub, name, f"{prefix}.{name}" if prefix else name))
    return found


def _shared_parameters(module: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _prefix, sub in module.named_modules(remove_duplicate=False):
        for param in sub.parameters(recurse=False):
            seen[id(param)] = seen.get(id(param), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def magnitude_masks(module: nn.Module, amount: float, scope: str) -> dict[str, torch.Tensor]:
    """Masks (1 keep, 0 pruned) of the smallest-magnitude weights: ``amount`` of all prunable
    weights together (``global``) or of each layer (``layer``), by ``torch.nn.utils.prune``."""
    params = [(sub, name) for sub, name, _key in prunable(module)]
    if scope == "global":
        prune.global_unstructured(params, prune.L1Unstructured, amount=amount)
    else:
        for sub, name in params:
            prune.l1_unstructured(sub, name, amount=amount)
    masks = {key: getattr(sub, f"{name}_mask").clone() for sub, name, key in _pruned(module)}
    make_permanent(module)
    return masks


def _pruned(module: nn.Module) -> list[tuple[nn.Module, str, str]]:
    found = []
    for prefix, sub in module.named_modules():
        for name, _buf in sub.named_buffers(recurse=False):
            if name.endswith("_mask"):
                param = name.removesuffix("_mask")
                found.append((sub, param, f"{prefix}.{param}" if prefix else param))
    return found


def apply_masks(module: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """Registers fixed masks (``prune.custom_from_mask``): training keeps the pruned weights
    at zero (they are ``weight_orig * weight_mask``)."""
    for key, mask in masks.items():
        owner, _, name = key.rpartition(".")
        prune.custom_from_mask(module.get_submodule(owner), name, mask)
    return module


def make_permanent(module: nn.Module) -> nn.Module:
    """Folds every mask into its weight (``prune.remove``): a plain module with zeros in it."""
    for sub, name, _key in _pruned(module):
        prune.remove(sub, name)
    return module


def structured_prune(module: nn.Module, amount: float) -> dict[str, list[int]]:
    """Removes ``amount`` of the output channels (units) of every Conv2d/Linear but the last,
    by L2 norm (``prune.ln_structured`` picks them), from a network that is one chain of such
    layers with optional norms between (the CNN, the MLP): each removed channel goes from its
    layer, the norm after it and the input of the next layer. Returns the new shapes of the
    tensors that changed (what :func:`resize` redoes on load)."""
    before = {k: v.shape for k, v in module.state_dict().items()}
    layers = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    norms = {n: m for n, m in module.named_modules() if isinstance(m, NORMS)}
    names = [n for n, _ in module.named_modules()]
    for (name, layer), (next_name, following) in zip(layers, layers[1:], strict=False):
        prune.ln_structured(layer, "weight", amount=amount, n=2, dim=0)
        keep = layer.weight_mask.flatten(1).any(1).nonzero().flatten()
        prune.remove(layer, "weight")
        _take(layer, "weight", 0, keep)
        _take(layer, "bias", 0, keep)
        between = names[names.index(name) + 1 : names.index(next_name)]
        for norm_name in (n for n in between if n in norms):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _take(norms[norm_name], attr, 0, keep)
        _take(following, "weight", 1, keep)
        _sync_sizes(module)
    return {k: list(v.shape) for k, v in module.state_dict().items() if before[k] != v.shape}


NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)


def _take(module: nn.Module, attr: str, dim: int, keep: torch.Tensor) -> None:
    tensor = getattr(module, attr, None)
    if tensor is None:
        return
    data = tensor.detach().index_select(dim, keep).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(module, attr, nn.Parameter(data, requires_grad=tensor.requires_grad))
    else:
        setattr(module, attr, data)


def resize(module: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Gives the tensors named in ``shapes`` (state-dict keys) those shapes, as structured
    pruning left them, so that the pruned weights load into a network built from ``hparams``."""
    for key, shape in shapes.items():
        owner, _, attr = key.rpartition(".")
        sub = module.get_submodule(owner)
        old = getattr(sub, attr)
        new = torch.zeros(shape, dtype=old.dtype)
        setattr(
            sub,
            attr,
            nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new,
        )
    _sync_sizes(module)
    return module


def _sync_sizes(module: nn.Module) -> None:
    """Makes each layer's size attributes agree with its (resized) tensors."""
    for sub in module.modules():
        if isinstance(sub, nn.Conv2d):
            sub.out_channels, sub.in_channels = sub.weight.shape[0], sub.weight.shape[1]
        elif isinstance(sub, nn.Linear):
            sub.out_features, sub.in_features = sub.weight.shape
        elif isinstance(sub, nn.BatchNorm1d | nn.BatchNorm2d) and sub.running_mean is not None:
            sub.num_features = sub.running_mean.shape[0]
        elif isinstance(sub, nn.LayerNorm) and sub.weight is not None:
            sub.normalized_shape = tuple(sub.weight.shape)


def sparsity(module: nn.Module) -> float:
    """The share of zeros among the prunable weights."""
    zeros = total = 0
    for sub, name, _key in prunable(module):
        weight = getattr(sub, name)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)


# --- quantization -------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # torch.ao.quantization warns on every call that it is deprecated (its PT2E half moved to
    # torchao). quantize_dynamic is still the only int8 route for nn.LSTM in torch 2.13 and
    # it works, so the warning is silenced here on purpose, and only here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions")
        yield


def quantize_dynamic(module: nn.Module) -> nn.Module:
    """Dynamic int8 (weights int8, activations quantized per batch) of every Linear and LSTM."""
    with _quiet_deprecation():
        return torch.ao.quantization.quantize_dynamic(module, DYNAMIC, dtype=torch.qint8)


def _dynamic_modules(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    from torch.ao.nn.quantized import dynamic

    for name, sub in module.named_modules():
        if isinstance(sub, dynamic.Linear | dynamic.LSTM):
            yield name, sub


def pack_dynamic(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state of a dynamically quantized network as plain tensors: a quantized module's
    weights as int8 with their scale and zero point (its packed form is a TorchScript object,
    which ``weights_only`` loading refuses), everything else as it is."""
    from torch.ao.nn.quantized import dynamic

    state: dict[str, torch.Tensor] = {}
    quantized = dict(_dynamic_modules(module))
    for name, sub in quantized.items():
        if isinstance(sub, dynamic.Linear):
            tensors = {"weight": sub.weight(), "bias": sub.bias()}
        else:
            parts = sub._weight_bias()
            tensors = {**parts["weight"], **parts["bias"]}
        for key, tensor in tensors.items():
            if tensor is None:
                continue
            full = f"{INT8}{name}.{key}"
            if tensor.is_quantized:
                state[full] = tensor.int_repr()
                state[f"{full}.scale"] = torch.tensor(tensor.q_scale(), dtype=torch.float64)
                state[f"{full}.zero_point"] = torch.tensor(tensor.q_zero_point())
            else:
                state[full] = tensor.detach()
    for key, value in module.state_dict().items():
        if isinstance(value, torch.Tensor) and not any(key.startswith(f"{q}.") for q in quantized):
            state[key] = value
    return state


def unpack_dynamic(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Loads :func:`pack_dynamic`'s state into a network just made by :func:`quantize_dynamic`
    (the same int8 values, scales and zero points: the same outputs)."""
    from torch.ao.nn.quantized import dynamic

    def tensor(full: str) -> torch.Tensor:
        if f"{full}.scale" not in state:
            return state[full]
        scale, zero = float(state[f"{full}.scale"]), int(state[f"{full}.zero_point"])
        values = (state[full].float() - zero) * scale  # exact: round() gives the ints back
        return torch.quantize_per_tensor(values, scale, zero, torch.qint8)

    with _quiet_deprecation():
        for name, sub in _dynamic_modules(module):
            if isinstance(sub, dynamic.Linear):
                bias = f"{INT8}{name}.bias"
                sub.set_weight_bias(tensor(f"{INT8}{name}.weight"), state.get(bias))
            else:
                current = sub._weight_bias()
                names = [*current["weight"], *current["bias"]]
                sub.set_weight_bias({k: tensor(f"{INT8}{name}.{k}") for k in names})
    rest = {k: v for k, v in state.items() if not k.startswith(INT8)}
    # The other tensors are copied one by one: a quantized module's own state-dict loading
    # expects its packed form, which is not there.
    plain = {
        k: v
        for k, v in module.state_dict().items()
        if isinstance(v, torch.Tensor) and not k.startswith(INT8)
    }
    quantized = [name for name, _ in _dynamic_modules(module)]
    plain = {k: v for k, v in plain.items() if not any(k.startswith(f"{q}.") for q in quantized)}
    if set(plain) != set(rest):
        raise ValueError(
            f"the saved int8 state does not fit: missing {sorted(set(plain) - set(rest))}, "
            f"extra {sorted(set(rest) - set(plain))}"
        )
    with torch.no_grad():
        for key, value in rest.items():
            plain[key].copy_(value)
    return module


def quantize_weight_only(module: nn.Module) -> nn.Module:
    """int8 weights of every Linear through torchao (``Int8WeightOnlyConfig``), in place."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(module, Int8WeightOnlyConfig())
    return module


def prepare_static(module: nn.Module, example: torch.Tensor) -> nn.Module:
    """The CNN exported (any batch size) and prepared for static int8 by torchao's PT2E flow
    with the x86 Inductor quantizer: run calibration batches through it, then
    :func:`convert_static`."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with torch.no_grad():
        exported = torch.export.export(module.eval(), (example,), dynamic_shapes=({0: batch},))
    quantizer = x86.X86InductorQuantizer()
    quantizer.set_global(x86.get_default_x86_inductor_quantization_config())
    return prepare_pt2e(exported.module(), quantizer)


def convert_static(prepared: nn.Module) -> nn.Module:
    """The calibrated graph in int8, compiled by Inductor when first called."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    return Compiled(convert_pt2e(prepared))


class Compiled(nn.Module):
    """A converted PT2E graph, compiled on its first call. Inductor's freezing (weights as
    constants) is what lets it pick oneDNN's int8 convolutions: without it the int8 graph runs
    slower than fp32.

    Compiled for fixed batch sizes only: in torch 2.13 Inductor's int8 convolution lowering
    gets the output strides wrong when the batch dimension is symbolic (an ``assert_size_stride``
    failure on the first dynamic recompile). So a batch runs in chunks of at most
    :attr:`CHUNK` rows, each padded to the next power of two (at least 2: a batch of one
    specializes differently): eight sizes at most, within Dynamo's recompile limit.
    """

    CHUNK = 256

    def __init__(self, graph: nn.Module):
        super().__init__()
        self.graph = graph
        self._compiled = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor

        with inductor.patch(freezing=True), torch.no_grad():
            if self._compiled is None:
                self._compiled = torch.compile(self.graph, dynamic=False)
            return torch.cat([self._padded(part) for part in x.split(self.CHUNK)])

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        size = max(2, 1 << (n - 1).bit_length())
        if size != n:
            x = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))])
        return self._compiled(x.contiguous())[:n]

    def train(self, mode: bool = True) -> Compiled:
        return self  # an exported graph has no train mode (it runs as it was exported: eval)


# --- rebuilding on load -------------------------------------------------------------------


def restore(module: nn.Module, recipe: dict[str, Any], state: dict[str, Any], bundle) -> nn.Module:
    """Redoes a compressed bundle's ``recipe`` (``bundle.meta["compression"]``) on the network
    built from its ``hparams`` and loads its saved ``state``: what the family loader gets."""
    resize(module, recipe.get("shapes") or {})
    module.eval()
    method = recipe.get("quantize", "none")
    if method == "dynamic":
        return unpack_dynamic(quantize_dynamic(module), state)
    if method == "weight_only":
        quantize_weight_only(module)
        module.load_state_dict(state, assign=True)
        return module
    if method == "static":
        prepared = prepare_static(module, example_images(bundle, 2))
        prepared.load_state_dict(state)
        return convert_static(prepared)
    module.load_state_dict(state)
    return module


def example_images(bundle, n: int) -> torch.Tensor:
    """Zeros of the shape of ``n`` of a bundle's images (to export a CNN)."""
    return torch.zeros(n, *bundle.input["shape"])


# --- measuring ----------------------------------------------------------------------------


def latency_ms(modules: dict[str, nn.Module], inputs: tuple, warmup: int, rounds: int) -> dict:
    """The median milliseconds of one forward pass of each module on ``inputs``, after
    ``warmup`` passes, timed in interleaved rounds (so that load on the machine falls on all
    alike), at the current thread count."""
    times: dict[str, list[float]] = {name: [] for name in modules}
    with torch.no_grad():
        for module in modules.values():
            for _ in range(warmup):
                module(*inputs)
        for _ in range(rounds):
            for name, module in modules.items():
                started = time.perf_counter()
                module(*inputs)
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}
