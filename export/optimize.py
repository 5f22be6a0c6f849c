"""Export-time graph rewrites that make the Pix2Struct ONNX encoder fast on CPU.

Optimum's Pix2Struct encoder spends about half of its time outside the MatMuls: every layer
rebuilds the additive attention-mask bias as a full ``batch x heads x seq x seq`` tensor
(ConstantOfShape + Add + Sub + Equal + Where + Max, all memory-bound), and attention is spelled
as MatMul/Softmax/MatMul with four transposes. ONNX Runtime's own optimiser and
``onnxruntime.transformers`` fuse none of that (ORT does fuse the norms and GELU). This module matches the graph
with plain ``onnx`` and rewrites it:

- ``dynamic_patches``: the patch axis of the inputs becomes symbolic, so the engine may drop
  trailing padded patches instead of masking them (``optimize_decoder`` does the same for the
  decoders' encoder axis).
- ``attention``: each self-attention block (Q/K/V projections, reshapes, transposes, scores,
  mask bias, softmax, context) becomes ``com.microsoft.MultiHeadAttention`` with ``scale=1.0``
  (Pix2Struct does not scale scores by 1/sqrt(d)) inside ``If(no padding in the batch)``: the
  unmasked node runs ONNX Runtime's MLAS flash attention, the masked one takes the encoder's
  ``attention_mask`` (cast to int32 once for all layers) as ``key_padding_mask``. The per-layer
  mask-bias subgraph becomes dead and is removed. ``attention_op="Attention"`` gives one packed
  ``com.microsoft.Attention`` node instead (QAttention after int8), measured slower.
- ``skip_rms_norm``: a residual Add followed by a Pix2Struct RMS norm (T5 LayerNorm: no mean,
  no bias) becomes one ``com.microsoft.SkipSimplifiedLayerNormalization`` whose fourth output
  carries the residual sum; the final norm and remaining ones become ``SimplifiedLayerNormalization``.
- ``fast_gelu``: the tanh-approximated GELU of the gated MLP becomes ``com.microsoft.FastGelu``.
- ``noop_casts``: float->float Casts left by the export are removed.

The rewritten graph is then optionally passed through ONNX Runtime's own level-2 optimiser and
saved, so that the engine can load it with ``graph_optimization="basic"`` (or "disabled") and
start fast. ``verify_same_outputs`` runs the original and the rewritten graph on the same
random inputs, with and without padding, and is what the tests and the export use to check
every rewrite.

Only ``onnx``, ``numpy`` and ``onnxruntime`` are imported: no torch.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# Pix2Struct masks padded keys with the most negative float32 (torch.finfo(float32).min).
MASK_FILTER_VALUE = float(np.finfo(np.float32).min)
ENCODER_REWRITES = ("dynamic_patches", "noop_casts", "attention", "skip_rms_norm", "fast_gelu")
# Inputs/outputs whose patch axis (axis 1) `dynamic_patches` turns from max_patches into a symbol.
ENCODER_PATCH_AXES = ("flattened_patches", "attention_mask", "last_hidden_state")
DECODER_PATCH_AXES = ("encoder_hidden_states", "encoder_attention_mask")


class OptimizeError(RuntimeError):
    """A rewritten graph failed to load or its outputs differ from the original's."""


class OutputsDiffer(OptimizeError):
    """A rewritten graph loads and runs, but its outputs differ from the original's (a failed check)."""


# ----------------------------------------------------------------------------- graph helpers


class _Graph:
    """Producer/consumer/constant look-ups over a mutable ``onnx.GraphProto``."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self._counter = 0
        self.refresh()

    def refresh(self) -> None:
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                if out:
                    self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in self.graph.output}

    def unique(self, stem: str) -> str:
        self._counter += 1
        return f"edlight/{stem}_{self._counter}"

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant-node output, else None."""
        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), np.float32)
                if attr.name == "value_int":
                    return np.array(attr.i, np.int64)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), np.int64)
        if node is not None and node.op_type == "Identity":
            return self.const(node.input[0])
        return None

    def scalar(self, name: str) -> float | None:
        value = self.const(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(()))

    def weight_name(self, name: str) -> str | None:
        """Follow Identity chains (Optimum dedups tied weights through them) to an initializer."""
        while name not in self.inits:
            node = self.producer.get(name)
            if node is None or node.op_type != "Identity":
                return None
            name = node.input[0]
        return name

    def prod(self, name: str, op_type: str) -> onnx.NodeProto | None:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type else None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        users = self.consumers.get(name, [])
        if len(users) == 1 and name not in self.graph_outputs:
            return users[0]
        return None

    def other_input(self, node: onnx.NodeProto, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    def rename_uses(self, old: str, new: str) -> None:
        """Point every consumer of ``old`` at ``new`` (graph outputs keep their name)."""
        for node in self.graph.node:
            for i, inp in enumerate(node.input):
                if inp == old:
                    node.input[i] = new

    def add_init(self, name: str, array: np.ndarray) -> str:
        tensor = numpy_helper.from_array(array, name)
        self.graph.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def remove_dead(self) -> int:
        """Drop nodes whose outputs nobody uses, then unused initializers. Returns nodes removed."""
        removed = 0
        while True:
            used = {o.name for o in self.graph.output}
            for node in self.graph.node:
                used.update(_node_reads(node))
            keep = [n for n in self.graph.node if any(o in used for o in n.output if o)]
            if len(keep) == len(self.graph.node):
                break
            removed += len(self.graph.node) - len(keep)
            del self.graph.node[:]
            self.graph.node.extend(keep)
        used_inits = {i for n in self.graph.node for i in _node_reads(n)}
        used_inits.update(o.name for o in self.graph.output)
        produced = {o for n in self.graph.node for o in n.output}
        stale = [vi for vi in self.graph.value_info if vi.name not in produced]
        for vi in stale:
            self.graph.value_info.remove(vi)
        dead = [t for t in self.graph.initializer if t.name not in used_inits]
        for tensor in dead:
            self.graph.initializer.remove(tensor)
            self.inits.pop(tensor.name, None)
        self.refresh()
        return removed

    def insert_before(self, anchor: onnx.NodeProto, nodes: Iterable[onnx.NodeProto]) -> None:
        """Insert nodes just before ``anchor`` so the node list stays topologically sorted."""
        index = list(self.graph.node).index(anchor)
        declared = {vi.name for vi in self.graph.value_info}
        for offset, node in enumerate(nodes):
            self.graph.node.insert(index + offset, node)
            # ONNX shape inference cannot type contrib-op outputs; the int8 quantizer needs the
            # type of every tensor it touches, so declare them float32 here.
            for out in node.output:
                if out and out not in declared and out not in self.graph_outputs:
                    self.graph.value_info.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
                    declared.add(out)

    def ensure_ms_opset(self) -> None:
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _node_reads(node: onnx.NodeProto) -> set[str]:
    """Tensor names a node reads, including outer-scope names read inside its If/Loop bodies."""
    reads = {i for i in node.input if i}
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            local = {o for n in body.node for o in n.output} | {i.name for i in body.input}
            local |= {t.name for t in body.initializer}
            for inner in body.node:
                reads |= _node_reads(inner) - local
    return reads


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors whose element type shape inference says is float32."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=False)
    g = inferred.graph
    names = {t.name for t in g.initializer if t.data_type == TensorProto.FLOAT}
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            names.add(vi.name)
    return names


# ----------------------------------------------------------------------------- rewrites


def make_patch_axis_dynamic(g: _Graph, names: Iterable[str], symbol: str) -> int:
    """Give axis 1 of the named graph inputs/outputs a symbolic size instead of max_patches.

    Optimum fixes the patch count to the processor's ``max_patches``. Nothing inside the graph
    depends on it (reshapes use -1, row/column ids travel in the patches), so the engine may
    drop trailing padded patches and run shorter sequences: fewer FLOPs, no mask, and the
    flash-attention path. Stale intermediate shapes are cleared so ONNX Runtime re-infers them.
    """
    wanted = set(names)
    count = 0
    for vi in list(g.graph.input) + list(g.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if vi.name in wanted and len(dims) > 1 and dims[1].HasField("dim_value"):
            dims[1].ClearField("dim_value")
            dims[1].dim_param = symbol
            count += 1
    if count:
        for vi in g.graph.value_info:
            if vi.type.HasField("tensor_type"):
                vi.type.tensor_type.ClearField("shape")
    return count


def remove_noop_casts(g: _Graph) -> int:
    """Remove Cast(to=float) nodes whose input already is float (the export leaves one per norm)."""
    floats = _float_tensors(g.model)
    count = 0
    for node in list(g.graph.node):
        if node.op_type != "Cast" or node.input[0] not in floats:
            continue
        to = next(a.i for a in node.attribute if a.name == "to")
        if to != TensorProto.FLOAT or node.output[0] in g.graph_outputs:
            continue
        g.rename_uses(node.output[0], node.input[0])
        count += 1
    g.remove_dead()
    return count


@dataclass
class _AttentionMatch:
    x: str  # normed hidden states, input of the Q/K/V projections
    wq: str
    wk: str
    wv: str
    num_heads: int
    scale: float
    has_mask: bool
    output: str  # tensor the fused node must produce ([B, S, hidden])
    anchor: onnx.NodeProto  # first node of the block, for topological insertion


def _split_heads(g: _Graph, name: str, perm: list[int]) -> tuple[str, str, int] | None:
    """Match Transpose(perm)(Reshape(MatMul(x, W), [B, -1, heads, head_dim])) -> (x, W, heads)."""
    tr = g.prod(name, "Transpose")
    if tr is None or list(next(a.ints for a in tr.attribute if a.name == "perm")) != perm:
        return None
    rs = g.prod(tr.input[0], "Reshape")
    if rs is None:
        return None
    mm = g.prod(rs.input[0], "MatMul")
    if mm is None:
        return None
    weight = g.weight_name(mm.input[1])
    if weight is None:
        return None
    shape = g.const(rs.input[1])
    heads: int | None = None
    if shape is not None and shape.size == 4:
        heads = int(shape[2])
    else:
        concat = g.prod(rs.input[1], "Concat")
        if concat is not None and len(concat.input) == 4:
            value = g.const(concat.input[2])
            heads = int(value.reshape(-1)[0]) if value is not None else None
    if heads is None or heads <= 0:
        return None
    return mm.input[0], weight, heads


def _match_attention(g: _Graph, softmax: onnx.NodeProto, mask_input: str | None) -> _AttentionMatch | None:
    # scores -> [Max(clamp)] -> Softmax -> probs
    scores = softmax.input[0]
    node = g.producer.get(scores)
    if node is not None and node.op_type == "Max":
        clamp = g.scalar(node.input[1])
        if clamp is None or clamp > MASK_FILTER_VALUE / 2:
            return None
        scores = node.input[0]
        node = g.producer.get(scores)
    has_mask = False
    if node is not None and node.op_type == "Add":
        qk = next((i for i in node.input if g.prod(i, "MatMul") is not None), None)
        if qk is None:
            return None
        bias = g.other_input(node, qk)
        # The bias must come from the encoder's attention_mask and nothing else that varies.
        if mask_input is None or not _derives_only_from(g, bias, mask_input):
            return None
        has_mask = True
        node = g.producer[qk]
    scale = 1.0
    if node is not None and node.op_type in ("Mul", "Div"):
        factor = g.scalar(node.input[1])
        if factor is None:
            return None
        scale = factor if node.op_type == "Mul" else 1.0 / factor
        node = g.producer.get(node.input[0])
    if node is None or node.op_type != "MatMul":
        return None
    q = _split_heads(g, node.input[0], [0, 2, 1, 3])
    k = _split_heads(g, node.input[1], [0, 2, 3, 1])
    users = g.consumers.get(softmax.output[0], [])
    if q is None or k is None or len(users) != 1 or users[0].op_type != "MatMul":
        return None
    pv = users[0]
    if pv.input[0] != softmax.output[0]:
        return None
    v = _split_heads(g, pv.input[1], [0, 2, 1, 3])
    if v is None or not (q[0] == k[0] == v[0]) or not (q[2] == k[2] == v[2]):
        return None
    merge_tr = g.only_consumer(pv.output[0])
    if merge_tr is None or merge_tr.op_type != "Transpose":
        return None
    if list(next(a.ints for a in merge_tr.attribute if a.name == "perm")) != [0, 2, 1, 3]:
        return None
    merge_rs = g.only_consumer(merge_tr.output[0])
    if merge_rs is None or merge_rs.op_type != "Reshape":
        return None
    shapes = [g.inits[w].dims for w in (q[1], k[1], v[1])]
    if any(len(s) != 2 or s[0] != shapes[0][0] or s[1] != shapes[0][1] for s in shapes):
        return None
    anchor = g.producer[g.producer[g.producer[node.input[0]].input[0]].input[0]]  # the Q MatMul
    return _AttentionMatch(
        x=q[0],
        wq=q[1],
        wk=k[1],
        wv=v[1],
        num_heads=q[2],
        scale=scale,
        has_mask=has_mask,
        output=merge_rs.output[0],
        anchor=anchor,
    )


def _derives_only_from(g: _Graph, name: str, graph_input: str, limit: int = 64) -> bool:
    """True when every non-constant leaf above ``name`` is ``graph_input`` (or a Shape of anything)."""
    stack, seen = [name], set()
    while stack:
        cur = stack.pop()
        if cur in seen or cur in g.inits:
            continue
        seen.add(cur)
        if len(seen) > limit:
            return False
        node = g.producer.get(cur)
        if node is None:
            if cur != graph_input:
                return False
            continue
        if node.op_type in ("Constant", "Shape"):
            continue  # shapes only broadcast the bias, they carry no values
        stack.extend(i for i in node.input if i)
    return graph_input in seen


def fuse_attention(
    g: _Graph,
    mask_input: str | None,
    op: str = "MultiHeadAttention",
    use_mask: bool = True,
    flash_when_unpadded: bool = True,
) -> int:
    """Replace each matched self-attention block with fused contrib nodes.

    ``op="Attention"`` packs Q/K/V into one weight (one GEMM; int8 quantizes it to QAttention).
    ``op="MultiHeadAttention"`` keeps three projection MatMuls. ONNX Runtime runs an unmasked
    MultiHeadAttention through MLAS flash attention (tiled, never materialises the
    ``heads x seq x seq`` scores) but a masked one through the plain path; with
    ``flash_when_unpadded`` each layer becomes ``If(no padding in the batch, MHA, masked MHA)`` so
    batches without padding take the fast path and padded ones stay exact.
    ``use_mask=False`` drops the padding mask: only correct when padded patches are never fed.
    """
    mask_i32: str | None = None
    no_padding: str | None = None
    count = 0
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        match = _match_attention(g, softmax, mask_input)
        if match is None:
            continue
        g.ensure_ms_opset()
        new_nodes = []
        if op == "Attention":
            wq, wk, wv = (numpy_helper.to_array(g.inits[w]) for w in (match.wq, match.wk, match.wv))
            packed = g.add_init(g.unique("qkv_weight"), np.concatenate([wq, wk, wv], axis=1))
            # QAttention (int8) requires a bias input, so the fp32 node carries a zero one too.
            bias = g.add_init(g.unique("qkv_bias"), np.zeros(wq.shape[1] * 3, np.float32))
            inputs = [match.x, packed, bias]
        else:
            inputs = []
            for w in (match.wq, match.wk, match.wv):
                proj = g.unique("proj")
                new_nodes.append(helper.make_node("MatMul", [match.x, w], [proj], name=proj))
                inputs.append(proj)
            inputs.append("")  # bias
        attrs: dict[str, Any] = {
            "num_heads": match.num_heads,
            "scale": match.scale,
            "mask_filter_value": MASK_FILTER_VALUE,
        }
        masked = match.has_mask and use_mask
        if masked and mask_i32 is None:
            assert mask_input is not None
            mask_i32 = "edlight/attention_mask_int32"
            prologue = [
                helper.make_node(
                    "Cast", [mask_input], [mask_i32], name="edlight/mask_cast", to=TensorProto.INT32
                )
            ]
            if op == "MultiHeadAttention" and flash_when_unpadded:
                one = g.add_init("edlight/one_int32", np.array(1, np.int32))
                no_padding = "edlight/no_padding"
                prologue += [
                    helper.make_node(
                        "ReduceMin", [mask_i32], ["edlight/mask_min"], name="edlight/mask_min", keepdims=0
                    ),
                    helper.make_node(
                        "Equal", ["edlight/mask_min", one], [no_padding], name="edlight/no_padding"
                    ),
                ]
            for i, node in enumerate(prologue):
                g.graph.node.insert(i, node)
        if masked and no_padding is not None and mask_i32 is not None:
            # Both branches read Q/K/V and the mask from the outer scope: no weights are duplicated.
            branches = {}
            for branch, branch_inputs in (("flash", inputs), ("masked", [*inputs, mask_i32])):
                out = g.unique(f"mha_{branch}_out")
                body = helper.make_node(
                    op, branch_inputs, [out], name=g.unique(op), domain=MS_DOMAIN, **attrs
                )
                branches[branch] = helper.make_graph(
                    [body],
                    g.unique(branch),
                    [],
                    [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                )
            new_nodes.append(
                helper.make_node(
                    "If",
                    [no_padding],
                    [match.output],
                    name=g.unique("attention_if"),
                    then_branch=branches["flash"],
                    else_branch=branches["masked"],
                )
            )
        else:
            if masked and mask_i32 is not None:
                inputs.append(mask_i32)
            new_nodes.append(
                helper.make_node(op, inputs, [match.output], name=g.unique(op), domain=MS_DOMAIN, **attrs)
            )
        # The old producer of match.output (the merge Reshape) dies with the rest of the block.
        old = g.producer[match.output]
        old.output[0] = g.unique("dead")
        g.insert_before(match.anchor, new_nodes)
        g.refresh()
        count += 1
    g.remove_dead()
    return count


def _match_rms_norm(g: _Graph, pow_node: onnx.NodeProto) -> tuple[str, str, float, str] | None:
    """Match w * (x * 1/sqrt(mean(x^2) + eps)) (or x / sqrt(...)) -> (x, weight, eps, output)."""
    if g.scalar(pow_node.input[1]) != 2.0:
        return None
    x = pow_node.input[0]
    rm = g.only_consumer(pow_node.output[0])
    if rm is None or rm.op_type != "ReduceMean":
        return None
    axes = g.const(rm.input[1]) if len(rm.input) > 1 else None
    if axes is None:
        axes_attr = [a for a in rm.attribute if a.name == "axes"]
        axes = np.array(list(axes_attr[0].ints)) if axes_attr else None
    if axes is None or axes.reshape(-1).tolist() != [-1]:
        return None
    add = g.only_consumer(rm.output[0])
    if add is None or add.op_type != "Add":
        return None
    eps = g.scalar(g.other_input(add, rm.output[0]))
    sqrt = g.only_consumer(add.output[0])
    if eps is None or sqrt is None or sqrt.op_type != "Sqrt":
        return None
    nxt = g.only_consumer(sqrt.output[0])
    if nxt is None:
        return None
    if nxt.op_type == "Div" and nxt.input[1] == sqrt.output[0] and nxt.input[0] == x:
        normed = nxt.output[0]
    elif nxt.op_type == "Div" and nxt.input[1] == sqrt.output[0] and g.scalar(nxt.input[0]) == 1.0:
        mul = g.only_consumer(nxt.output[0])
        if mul is None or mul.op_type != "Mul" or g.other_input(mul, nxt.output[0]) != x:
            return None
        normed = mul.output[0]
    else:
        return None
    scale = g.only_consumer(normed)
    if scale is None or scale.op_type != "Mul":
        return None
    weight = g.weight_name(g.other_input(scale, normed))
    if weight is None:
        return None
    return x, weight, eps, scale.output[0]


def fuse_rms_norm(g: _Graph, with_skip: bool = True) -> tuple[int, int]:
    """Fuse RMS norms, absorbing the residual Add before them. Returns (skip fused, plain fused)."""
    skip_count = plain_count = 0
    for pow_node in [n for n in g.graph.node if n.op_type == "Pow"]:
        match = _match_rms_norm(g, pow_node)
        if match is None:
            continue
        x, weight, eps, out = match
        g.ensure_ms_opset()
        residual = g.prod(x, "Add") if with_skip else None
        if residual is not None and any(g.const(i) is not None for i in residual.input):
            residual = None  # a bias add, not a residual
        if residual is not None:
            # Other users of x (the next residual Add) read the sum from output 3.
            node = helper.make_node(
                "SkipSimplifiedLayerNormalization",
                [residual.input[0], residual.input[1], weight],
                [out, "", "", x],
                name=g.unique("SkipRMSNorm"),
                domain=MS_DOMAIN,
                epsilon=eps,
            )
            residual.output[0] = g.unique("dead")
            anchor = residual
            skip_count += 1
        else:
            node = helper.make_node(
                "SimplifiedLayerNormalization",
                [x, weight],
                [out],
                name=g.unique("RMSNorm"),
                axis=-1,
                epsilon=eps,
                stash_type=1,
            )
            anchor = pow_node
            plain_count += 1
        g.producer[out].output[0] = g.unique("dead")
        g.insert_before(anchor, [node])
        g.refresh()
    g.remove_dead()
    return skip_count, plain_count


def fuse_fast_gelu(g: _Graph) -> int:
    """Fuse 0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3))) into com.microsoft.FastGelu."""
    count = 0
    for tanh in [n for n in g.graph.node if n.op_type == "Tanh"]:
        mul2 = g.prod(tanh.input[0], "Mul")
        if mul2 is None:
            continue
        inner_name = next((i for i in mul2.input if g.prod(i, "Add") is not None), None)
        c = g.scalar(g.other_input(mul2, inner_name)) if inner_name else None
        if inner_name is None or c is None or abs(c - 0.7978845608) > 1e-5:
            continue
        inner = g.producer[inner_name]
        cube_mul = next((g.producer[i] for i in inner.input if g.prod(i, "Mul") is not None), None)
        if cube_mul is None:
            continue
        x = g.other_input(inner, cube_mul.output[0])
        pow_name = next((i for i in cube_mul.input if g.prod(i, "Pow") is not None), None)
        if (
            pow_name is None
            or g.producer[pow_name].input[0] != x
            or g.scalar(g.producer[pow_name].input[1]) != 3.0
        ):
            continue
        plus_one = g.only_consumer(tanh.output[0])
        if (
            plus_one is None
            or plus_one.op_type != "Add"
            or g.scalar(g.other_input(plus_one, tanh.output[0])) != 1.0
        ):
            continue
        final = g.only_consumer(plus_one.output[0])
        if final is None or final.op_type != "Mul":
            continue
        half_name = g.other_input(final, plus_one.output[0])
        half = g.prod(half_name, "Mul")
        if half is None or x not in half.input or g.scalar(g.other_input(half, x)) != 0.5:
            continue
        g.ensure_ms_opset()
        node = helper.make_node(
            "FastGelu", [x], [final.output[0]], name=g.unique("FastGelu"), domain=MS_DOMAIN
        )
        final.output[0] = g.unique("dead")
        g.insert_before(half, [node])
        g.refresh()
        count += 1
    g.remove_dead()
    return count


# ----------------------------------------------------------------------------- public API


@dataclass
class OptimizeReport:
    """What ``optimize_encoder`` did: the rewrite names for the manifest, and per-rewrite counts."""

    rewrites: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    ort_optimized: bool = False


def _check_rewrites(rewrites: Iterable[str], attention_op: str) -> list[str]:
    wanted = list(rewrites)
    unknown = set(wanted) - set(ENCODER_REWRITES)
    if unknown:
        raise ValueError(f"unknown encoder rewrites {sorted(unknown)}; known: {list(ENCODER_REWRITES)}")
    if attention_op not in ("Attention", "MultiHeadAttention"):
        raise ValueError(f"attention_op must be 'Attention' or 'MultiHeadAttention', not {attention_op!r}")
    return wanted


def optimize_encoder_model(
    model: onnx.ModelProto,
    rewrites: Iterable[str] = ENCODER_REWRITES,
    attention_op: str = "MultiHeadAttention",
    use_mask: bool = True,
    flash_when_unpadded: bool = True,
) -> tuple[onnx.ModelProto, OptimizeReport]:
    """Apply the named rewrites to an in-memory Optimum Pix2Struct encoder (modified in place)."""
    wanted = _check_rewrites(rewrites, attention_op)
    g = _Graph(model)
    inputs = {i.name for i in g.graph.input}
    mask_input = "attention_mask" if "attention_mask" in inputs else None
    report = OptimizeReport()

    def note(name: str, count: int) -> None:
        report.counts[name] = count
        if count:
            report.rewrites.append(name)

    if "dynamic_patches" in wanted:
        note("dynamic_patches", make_patch_axis_dynamic(g, ENCODER_PATCH_AXES, "num_patches"))
    if "noop_casts" in wanted:
        note("noop_casts", remove_noop_casts(g))
    if "attention" in wanted:
        note("attention", fuse_attention(g, mask_input, attention_op, use_mask, flash_when_unpadded))
    if "skip_rms_norm" in wanted:
        skip, plain = fuse_rms_norm(g)
        note("skip_rms_norm", skip)
        note("rms_norm", plain)
    if "fast_gelu" in wanted:
        note("fast_gelu", fuse_fast_gelu(g))
    return model, report


def optimize_encoder(
    source: str | Path,
    target: str | Path,
    rewrites: Iterable[str] = ENCODER_REWRITES,
    ort_optimize: bool = True,
    attention_op: str = "MultiHeadAttention",
    use_mask: bool = True,
    flash_when_unpadded: bool = True,
) -> OptimizeReport:
    """Rewrite the encoder ONNX file ``source`` into ``target``.

    With ``ort_optimize`` the result is also run through ONNX Runtime's level-2 ("extended")
    optimiser once and saved that way, so sessions can load it with basic optimisation and skip
    that work at start-up (level 2 only uses portable fusions; no hardware-specific layouts).
    Returns the report; ``report.rewrites`` goes into the bundle manifest.
    Raises ``OptimizeError`` when the rewritten graph does not load in ONNX Runtime.
    """
    source, target = Path(source), Path(target)
    _check_rewrites(rewrites, attention_op)
    if not source.is_file():
        raise OptimizeError(f"{source}: no such ONNX file to optimise")
    model = onnx.load(str(source))
    model, report = optimize_encoder_model(model, rewrites, attention_op, use_mask, flash_when_unpadded)
    save_model(model, target)
    if ort_optimize:
        ort_optimize_file(target, target)
        report.ort_optimized = True
    log.info("encoder rewrites %s -> %s", report.counts, target)
    return report


def optimize_decoder(source: str | Path, target: str | Path) -> OptimizeReport:
    """Rewrite an Optimum Pix2Struct decoder file (plain, with-past or merged) into ``target``.

    Only ``dynamic_patches`` applies: the encoder's sequence axis of ``encoder_hidden_states`` and
    ``encoder_attention_mask`` becomes symbolic, so the decoder accepts an encoder output from
    which trailing padded patches were trimmed (less cross-attention work per token).
    Raises ``OptimizeError`` when ``source`` is missing or the result does not load.
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise OptimizeError(f"{source}: no such ONNX file to optimise")
    model = onnx.load(str(source))
    name_shared_weights(model.graph)
    g = _Graph(model)
    report = OptimizeReport()
    count = make_patch_axis_dynamic(g, DECODER_PATCH_AXES, "encoder_sequence_length")
    report.counts["dynamic_patches"] = count
    if count:
        report.rewrites.append("dynamic_patches")
    save_model(model, target)
    _check_loads(target)
    return report


# Optimum's merge of the two decoders names each weight they share after one of its two names
# ("onnx::MatMul_886_merged_0"), picked by set.pop(): by Python's per-process string hashing, so the same
# checkpoint gave a merged decoder with other names, other bytes and another model id at every export.
MERGED_NAME = re.compile(r"_merged_\d+$")


def name_shared_weights(graph: onnx.GraphProto) -> int:
    """Rename a merged decoder's shared weights by their place among the weights ("shared.<index>"), in
    `graph` and every subgraph that reads them, so that the export is byte-for-byte reproducible.
    Returns how many were renamed (0 for a graph that is not a merged decoder)."""
    taken = {
        name
        for sub in all_graphs(graph)
        for name in (
            *(t.name for t in sub.initializer), *(v.name for v in (*sub.input, *sub.output, *sub.value_info)),
            *(out for node in sub.node for out in node.output),
        )
    }  # fmt: skip
    renames = {}
    for index, tensor in enumerate(graph.initializer):
        if MERGED_NAME.search(tensor.name):
            new = f"shared.{index}"
            if new in taken:
                raise OptimizeError(f"cannot rename the shared weight {tensor.name!r}: {new!r} is taken")
            renames[tensor.name] = new
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for info in graph.input:  # graphs of IR < 4 list their weights as inputs too
        info.name = renames.get(info.name, info.name)
    for sub in all_graphs(graph):
        for node in sub.node:
            for k, name in enumerate(node.input):
                if name in renames:
                    node.input[k] = renames[name]
    return len(renames)


def _check_loads(path: Path) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise OptimizeError(f"{path}: ONNX Runtime could not load the rewritten graph: {exc}") from exc


def needs_external_data(model: onnx.ModelProto) -> bool:
    """True when `model` is too large for one protobuf file (2 GB, less a margin)."""
    return model.ByteSize() > (1 << 31) - (1 << 26)


def save_model(model: onnx.ModelProto, target: Path) -> None:
    """Save `model` to `target`, its weights in `target.name + ".data"` beside it when it needs that."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if needs_external_data(model):
        onnx.save(model, str(target), save_as_external_data=True, location=target.name + ".data")
    else:
        onnx.save(model, str(target))


# Graphs whose weights reach this size keep them in a side file, `<graph>.onnx.data`. ONNX Runtime maps such
# a file instead of parsing the weights out of the protobuf and copying them: the base fp32 decoder (760 MB)
# loaded in 1.3 s instead of 2.5 s on a 2-core machine, with 0.2 GB less peak memory. Smaller graphs load in
# a fraction of a second either way and stay one file (the default bundle is a few MB).
WEIGHTS_BESIDE_MIN_BYTES = 64 << 20


def store_weights_beside(path: Path, min_bytes: int | None = None) -> bool:
    """Rewrite the graph at `path` with its weights in `path.name + ".data"` beside it, when its initializers
    total at least `min_bytes` (default WEIGHTS_BESIDE_MIN_BYTES); returns whether it did. The same tensors,
    byte for byte: only where they are stored changes. A weights file the graph had under another name (an
    Optimum export over 2 GB) is removed. Raises OptimizeError when ONNX Runtime cannot load the result."""
    from onnx.external_data_helper import load_external_data_for_model

    model = onnx.load(str(path), load_external_data=False)
    old_sides = _weights_locations(model.graph)
    load_external_data_for_model(model, str(path.parent))
    initializers = [t for graph in all_graphs(model.graph) for t in graph.initializer]
    if sum(len(t.raw_data) for t in initializers) < (WEIGHTS_BESIDE_MIN_BYTES if min_bytes is None else min_bytes):
        return False
    side = path.name + ".data"
    mode = stat.S_IMODE(path.stat().st_mode)
    staging = path.parent / f".{path.name}.weights"
    staging.mkdir()
    try:
        # Tensors under 1 KB (shapes, split sizes) stay in the graph: ONNX Runtime's shape inference cannot
        # read them from a side file and refuses the graph.
        onnx.save(model, str(staging / path.name), save_as_external_data=True, location=side, size_threshold=1024)
        for name in (side, path.name):  # the weights first: a graph never points at a file not yet there
            os.chmod(staging / name, mode)  # onnx makes the weights file owner-only; deployments read bundles
            os.replace(staging / name, path.parent / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for old in old_sides - {side}:
        (path.parent / old).unlink(missing_ok=True)
    _check_loads(path)
    return True


def weights_files(path: Path) -> set[str]:
    """Names of the files (relative to its folder) that hold the weights of the graph at `path` besides itself."""
    return _weights_locations(onnx.load(str(path), load_external_data=False).graph)


def _weights_locations(graph: onnx.GraphProto) -> set[str]:
    """The external-data files `graph` (loaded without its external data) names for its tensors."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    tensors = [t for g in all_graphs(graph) for t in g.initializer]
    tensors += [t for g in all_graphs(graph) for node in g.node for a in node.attribute for t in (*([a.t] if a.HasField("t") else []), *a.tensors)]
    return {ExternalDataInfo(t).location for t in tensors if uses_external_data(t)}


def all_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """`graph` and every If/Loop body inside it, at any depth."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [*([attr.g] if attr.HasField("g") else []), *attr.graphs]:
                yield from all_graphs(sub)


def ort_optimize_file(source: Path, target: Path) -> None:
    """Run ONNX Runtime's extended graph optimiser once and save its result to ``target``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    tmp = target.with_name(target.name + ".ort.tmp")
    options.optimized_model_filepath = str(tmp)
    try:
        ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types
        raise OptimizeError(f"{source}: ONNX Runtime could not load the rewritten graph: {exc}") from exc
    tmp.replace(target)


def verify_same_outputs(
    original: str | Path,
    optimized: str | Path,
    feeds: list[dict[str, np.ndarray]],
    atol: float = 1e-3,
    rtol: float = 1e-3,
) -> float:
    """Run both graphs on each feed dict and return the largest abs difference of every output.

    Raises ``OptimizeError`` naming the output and the difference when it exceeds
    ``atol + rtol * |reference|`` anywhere.
    """
    import onnxruntime as ort

    def session(path: str | Path) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    ref, new = session(original), session(optimized)
    names = [o.name for o in ref.get_outputs()]
    worst = 0.0
    for feed in feeds:
        for name, a, b in zip(names, ref.run(names, feed), new.run(names, feed), strict=True):
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            worst = max(worst, float(diff.max()))
            if not np.all(diff <= atol + rtol * np.abs(a)):
                raise OutputsDiffer(f"{optimized}: output {name!r} differs from {original} by up to {diff.max():.3g}")
    return worst


def verify_encoder(
    original: str | Path, optimized: str | Path, atol: float = 1e-3, rtol: float = 1e-3
) -> float:
    """Check an optimised encoder against the original on random inputs: one unpadded image and
    a batch of two with a third of the patches padded (both attention paths). Returns the largest
    difference; raises ``OptimizeError`` beyond ``atol + rtol * |reference|``."""
    inp = onnx.load(str(original), load_external_data=False).graph.input
    dims = next(i for i in inp if i.name == "flattened_patches").type.tensor_type.shape.dim
    patches, patch_dim = dims[1].dim_value, dims[2].dim_value
    if not patches or not patch_dim:
        raise OptimizeError(f"{original}: flattened_patches has no static patch count to test with")
    feeds = [
        encoder_feeds(1, patches, patch_dim),
        encoder_feeds(2, patches, patch_dim, pad=patches // 3, seed=1),
    ]
    return verify_same_outputs(original, optimized, feeds, atol=atol, rtol=rtol)


def encoder_feeds(
    batch: int, num_patches: int, patch_dim: int, pad: int = 0, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random encoder inputs shaped like Pix2Struct's: row/column ids first, ``pad`` padded rows last."""
    rng = np.random.default_rng(seed)
    patches = rng.standard_normal((batch, num_patches, patch_dim)).astype(np.float32)
    cols = max(1, int(np.sqrt(num_patches)))
    patches[:, :, 0] = np.arange(num_patches) // cols + 1
    patches[:, :, 1] = np.arange(num_patches) % cols + 1
    mask = np.ones((batch, num_patches), np.int64)
    if pad:
        mask[:, num_patches - pad :] = 0
        patches[:, num_patches - pad :, :] = 0
    return {"flattened_patches": patches, "attention_mask": mask}
