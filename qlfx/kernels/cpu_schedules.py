"""Default CPU schedules for the TIR that Relax legalizes the non-fused ops into (dlight-style rules).

TVM 0.27 ships no x86 TOPI schedules, and its dlight CPU rules cover GEMV and a few reductions only:
every other legalized PrimFunc (conv2d, depthwise conv, pooling, the radial norms, broadcasts) is
compiled as written, one scalar loop nest on one thread. On qlnet50 that is 1.4 s per image against
48 ms for onnxruntime. These rules give each such PrimFunc a sane schedule before (or instead of)
tuning; MetaSchedule records, when the database has them, replace it.

Rules, tried in order (``ApplyDefaultSchedule(*default_rules())``):

``ConvNCHW`` -- a block ``out[n, f, y, x] = sum_{r...} in[n, g(f, r), y*s + ry, x*s + rx] * w[f, r...]``
  (conv2d, grouped and depthwise conv2d in NCHW; the block Relax's legalizer emits, followed by its
  fused epilogue: bias, residual add, relu). Register tile: ``ft`` output channels x ``yt`` rows x
  ``xt`` columns, ``xt`` the vector loop (the output row is contiguous; for stride 1 so is the input),
  ``ft`` chosen so that one input vector load feeds ``ft`` FMAs (broadcast weights) and
  ``ft*yt*ceil(xt/lanes)`` accumulators fit in 12 vector registers::

      for n, f_o, y_o in parallel:
        pad rows of this tile (depthwise / grouped: only its channels)  # when the conv pads
        for x_o:
          acc[ft, yt, xt] = 0                                          (unrolled, vectorised)
          for r...: acc[f, y, :] += w[f, r] * in[r, y*s + ry, x_o*xt*s + rx + s*(0..xt)]
          out[f, y, :] = epilogue(acc[f, y, :])                        (unrolled, vectorised)

  Every access to the accumulator is then a constant index, so LLVM keeps it in registers (see
  branch_product.py's notes). LLVM legalises vectors of any width (``xt`` = 28 is 3.5 AVX2 vectors),
  so the tile divides the row exactly and no loop needs a predicate.

``Reduction`` -- any other PrimFunc whose last block reduces (pooling, sums over channels, mean,
  the dense head): injective producers inlined, the spatial loops but the last fused and parallel, the
  reduction loops next, the last spatial loop innermost and vectorised when the inputs are contiguous
  along it (reductions over channels in NCHW), else the reduction innermost.

``Elementwise`` -- everything else: blocks inlined where possible, each remaining block's loops fused,
  split into parallel chunks and a vector tail.

Each rule returns None for a PrimFunc it does not match, so a later rule (or no schedule) applies.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import tvm
from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule

logger = logging.getLogger("qlfx.kernels.cpu_schedules")

# what a schedule primitive raises when it does not apply (ScheduleError is a RuntimeError)
_SCHEDULE_ERRORS = (RuntimeError, ValueError)

#: accumulator vector registers a conv tile may use (AVX2 and AVX-512 have 16 / 32; leave room for
#: the input vector and the broadcast weights)
ACCUMULATOR_REGISTERS = 12
#: lanes of one vector register for fp32 (AVX-512: 16, AVX2: 8); read from the target's mcpu
_AVX512 = ("skylake-avx512", "cascadelake", "cooperlake", "icelake", "sapphirerapids", "tigerlake",
           "znver4", "znver5", "rocketlake", "emeraldrapids", "graniterapids")


def vector_lanes(target: tvm.target.Target) -> int:
    """fp32 lanes per vector register of the target's CPU (8 unless its mcpu has AVX-512)."""
    mcpu = str(target.attrs.get("mcpu", "")) if target.attrs is not None else ""
    return 16 if any(mcpu.startswith(name) for name in _AVX512) else 8


def default_rules() -> list[ScheduleRule]:
    """The rules in the order they are tried."""
    return [ConvNCHW(), Reduction(), Elementwise()]


def apply_default_schedules(mod: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Schedule every unscheduled PrimFunc of ``mod`` for the llvm ``target`` with the rules above."""
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(*default_rules())(mod)


# ------------------------------------------------------------------------------------- helpers
def _is_cpu(target: tvm.target.Target) -> bool:
    return target.kind.name == "llvm"


def _static(extent: Any) -> int | None:
    return int(extent) if isinstance(extent, (int, tirx.IntImm)) else None


def _iter_kinds(block: tirx.SBlock) -> str:
    """'S' per data-parallel iter var, 'R' per reduction one, 'O' otherwise."""
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(int(iv.iter_type), "O") for iv in block.iter_vars)


def _root_blocks(sch: s_tir.Schedule) -> list:
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _uses(expr: Any, var: Any) -> bool:
    """Whether ``var`` occurs in ``expr``."""
    return any(v.same_as(var) for v in tirx.analysis.undefined_vars(expr, []))


def _inline_producers_and_chain(sch: s_tir.Schedule, keep: set) -> None:
    """Inline every injective block not in ``keep`` into its consumers, or (failing that) into its
    producer; blocks that can be inlined neither way stay."""
    changed = True
    while changed:
        changed = False
        for block in _root_blocks(sch):
            if sch.get(block).name_hint in keep:
                continue
            if "R" in _iter_kinds(sch.get(block)):
                continue
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                try:
                    inline(block)
                except _SCHEDULE_ERRORS:
                    continue
                changed = True
                break
            if changed:
                break


def _coefficient(expr: Any, var: Any) -> int | None:
    """The constant c of ``expr = c * var + rest`` (a sum of terms, rest free of var), or None."""
    terms, found = [expr], []
    while terms:
        term = terms.pop()
        if isinstance(term, (tirx.Add, tirx.Sub)):
            terms += [term.a, term.b]
        elif term.same_as(var):
            found.append(1)
        elif isinstance(term, tirx.Mul) and term.a.same_as(var) and isinstance(term.b, tirx.IntImm):
            found.append(int(term.b))
        elif isinstance(term, tirx.Mul) and term.b.same_as(var) and isinstance(term.a, tirx.IntImm):
            found.append(int(term.a))
        elif _uses(term, var):
            return None
    return found[0] if len(found) == 1 else None


def _largest_divisor(n: int, limit: int) -> int:
    return max(d for d in range(1, min(n, limit) + 1) if n % d == 0)


def _parallel_vector(sch: s_tir.Schedule, block: Any, lanes: int, chunk_limit: int = 64) -> None:
    """Fuse a spatial block's loops; the innermost <= ``chunk_limit`` elements that divide the last
    loop are vectorised, the rest is one parallel loop."""
    loops = sch.get_loops(block)
    if not loops:
        return
    last = _static(sch.get(loops[-1]).extent)
    if last is not None and last > 1:
        inner = _largest_divisor(last, chunk_limit)
        if inner > 1:
            outer_last, vec = sch.split(loops[-1], [None, inner])
            loops = list(loops[:-1]) + [outer_last, vec]
            sch.vectorize(vec)
            outer = loops[:-1]
        else:
            outer = loops
    else:
        outer = loops
    if len(outer) > 1:
        sch.parallel(sch.fuse(*outer))
    elif len(outer) == 1:
        sch.parallel(outer[0])


def _is_padding(block: tirx.SBlock) -> bool:
    """Whether a spatial block's value is a bounds-tested load (``if_then_else(inside, x[...], 0)``)."""
    value = block.body.value if isinstance(block.body, tirx.BufferStore) else None
    return isinstance(value, tirx.Select) or (
        isinstance(value, tvm.ir.expr.Call) and getattr(value.op, "name", "").endswith("if_then_else"))


# ---------------------------------------------------------------------------------------- conv
def conv_tile(out_channels: int, height: int, width: int, lanes: int,
              registers: int = ACCUMULATOR_REGISTERS, depthwise: bool = False) -> tuple[int, int, int]:
    """(ft, yt, xt) for a conv's register tile.

    Dense / grouped: when whole vectors divide the row, the tile of whole vectors with the most FMAs
    per load: each step loads ``yt*xt/lanes`` input vectors and broadcasts ``ft`` weights for
    ``ft*yt*xt/lanes`` FMAs (the 7x7/2 stem: 4 x 1 x 16 runs 3x faster than the 2 x 1 x 28 tile,
    whose half vector LLVM splits into narrower loads). Otherwise, and for depthwise: ``xt`` divides
    the row (the whole row when it is short), ``yt`` adds rows while the row is shorter than two
    vectors, ``ft`` fills the remaining accumulators (one for depthwise: its channels share no input)."""
    if not depthwise:
        best = None
        for xt in range(lanes, min(width, 4 * lanes) + 1, lanes):
            if width % xt:
                continue
            vecs = xt // lanes
            for yt in (d for d in range(1, 5) if height % d == 0):
                for ft in (d for d in range(1, out_channels + 1) if out_channels % d == 0):
                    accs = vecs * yt * ft
                    if accs > registers:
                        break
                    key = (accs / (vecs * yt + ft), accs, xt)
                    if best is None or key > best[0]:
                        best = (key, (ft, yt, xt))
        if best is not None:
            return best[1]
    if width <= 4 * lanes:
        xt = width
    else:
        # the longest row chunk of at most 4 vectors that divides the row
        xt = _largest_divisor(width, 4 * lanes)
    vecs = math.ceil(xt / lanes)
    yt = 1
    if depthwise:  # rows are its only register reuse (a 3x3 window reads each input row 3 times)
        yt = _largest_divisor(height, max(1, registers // vecs))
    elif xt < 2 * lanes:
        yt = _largest_divisor(height, max(1, registers // (2 * vecs)))
    ft = 1 if depthwise else _largest_divisor(out_channels, max(1, registers // (vecs * yt)))
    return ft, yt, xt


class ConvNCHW(ScheduleRule):
    """conv2d / grouped / depthwise conv2d in NCHW, with its epilogue (see the module docstring)."""

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return _is_cpu(target)

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        conv = self._conv_block(sch)
        if conv is None:
            return None
        try:
            self._schedule(sch, conv, vector_lanes(target))
        except _SCHEDULE_ERRORS as error:
            logger.debug("ConvNCHW does not apply: %s", error)
            return None
        return sch

    @staticmethod
    def _conv_block(sch: s_tir.Schedule):
        """The one block of kind SSSSR+ reading a 4-d input and a 4-d weight, or None."""
        found = None
        for block in _root_blocks(sch):
            stmt = sch.get(block)
            kinds = _iter_kinds(stmt)
            if "R" not in kinds:
                continue
            if found is not None or not (kinds.startswith("SSSS") and set(kinds[4:]) == {"R"}):
                return None
            if len(stmt.reads) != 2 or any(len(r.source.shape) != 4 for r in stmt.reads) \
                    or len(stmt.writes) != 1 or len(stmt.writes[0].source.shape) != 4:
                return None
            if not isinstance(stmt.body, tirx.BufferStore) or not isinstance(stmt.body.value, tirx.Add) \
                    or not isinstance(stmt.body.value.b, tirx.Mul):
                return None
            found = block
        return found

    def _schedule(self, sch: s_tir.Schedule, conv: Any, lanes: int) -> None:
        stmt = sch.get(conv)
        n, f, y, x, *reduce = sch.get_loops(conv)
        extents = [_static(sch.get(loop).extent) for loop in (f, y, x)]
        if None in extents:
            raise ValueError("symbolic channel or spatial extent")
        out_channels, height, width = extents
        f_var = stmt.iter_vars[1].var
        product = stmt.body.value.b
        if not isinstance(product.a, tvm.ir.expr.TensorLoad):
            raise ValueError("the product's first operand is not a load of the input")
        data = next(r for r in stmt.reads if r.source.same_as(product.a.source))
        # depthwise / grouped: the input channel depends on the output channel
        grouped = _uses(data.region[1].min, f_var)
        depthwise = grouped and all(_static(sch.get(r).extent) == 1 for r in reduce[:1])
        ft, yt, xt = conv_tile(out_channels, height, width, lanes, depthwise=depthwise)

        producers = [b for b in sch.get_producers(conv)]
        stride = _coefficient(data.region[3].min, stmt.iter_vars[3].var)
        phase_split = False
        if stride is not None and stride > 1 and len(producers) == 1:
            phase_split = self._split_phases(sch, producers[0], stride)
        consumers_chain = self._epilogue_chain(sch, conv)

        f_o, f_i = sch.split(f, [None, ft])
        y_o, y_i = sch.split(y, [None, yt])
        x_o, x_i = sch.split(x, [None, xt])
        # channel tiles outer: a tile's weights stay in L1 while it sweeps the rows (measured faster
        # than rows outer on the 1x1 convs of qlnet50, whose weight panels are the larger operand)
        sch.reorder(n, f_o, y_o, x_o, *reduce, f_i, y_i, x_i)
        # grouped / depthwise: one parallel task per channel tile, whose padded input (computed at
        # the task, below) then stays in L1 for all its rows
        anchor = sch.fuse(n, f_o) if grouped else sch.fuse(n, f_o, y_o)
        sch.parallel(anchor)
        sch.unroll(f_i)
        sch.unroll(y_i)
        sch.vectorize(x_i)

        if consumers_chain:
            for block in consumers_chain[:-1]:
                sch.compute_inline(block)
            last = consumers_chain[-1]
        else:
            last = sch.cache_write(conv, 0, "global")
        sch.reverse_compute_at(last, x_o, preserve_unit_loops=True)
        e_loops = sch.get_loops(last)[-4:]  # n, f, y, x inside the tile
        for loop in e_loops[:-1]:
            sch.unroll(loop)
        sch.vectorize(e_loops[-1])

        if reduce:
            init = sch.decompose_reduction(conv, reduce[0])
            i_loops = sch.get_loops(init)[-3:]
            sch.unroll(i_loops[0])
            sch.unroll(i_loops[1])
            sch.vectorize(i_loops[2])

        for producer in producers:
            # a padding stage stays a stage: inlined, its bounds test lands in the vector loop and every
            # load becomes a masked gather (the depthwise 3x3 ran at 2 GB/s that way)
            inline = not phase_split and not _is_padding(sch.get(producer))
            self._place_producer(sch, producer, anchor, grouped, lanes, inline=inline)

    @staticmethod
    def _epilogue_chain(sch: s_tir.Schedule, conv: Any) -> list:
        """The spatial blocks after the conv, in order (the fused bias / residual / activation)."""
        blocks = _root_blocks(sch)
        names = [sch.get(b).name_hint for b in blocks]
        index = names.index(sch.get(conv).name_hint)
        chain = blocks[index + 1:]
        if any("R" in _iter_kinds(sch.get(b)) for b in chain):
            raise ValueError("a reduction after the conv")
        return chain

    @staticmethod
    def _split_phases(sch: s_tir.Schedule, block: Any, stride: int) -> bool:
        """Store the padded input of a conv with column stride ``s`` as ``[n, c, h, w % s, w // s]``:
        the conv's reads ``in[.., (x*s + rx) % s, x + rx // s]`` are then contiguous along x, one
        vector load instead of a gather of every s-th element (the 7x7/2 stem, strided shortcuts)."""
        width = _static(sch.get(block).writes[0].source.shape[3])
        if width is None or width % stride:
            return False
        try:
            sch.transform_layout(block, ("write", 0), lambda n, c, h, w: (n, c, h, w % stride, w // stride))
        except _SCHEDULE_ERRORS as error:
            logger.debug("no phase split: %s", error)
            return False
        return True

    @staticmethod
    def _place_producer(sch: s_tir.Schedule, block: Any, anchor: Any, grouped: bool, lanes: int,
                        inline: bool = True) -> None:
        """The padding (or copy) stage before the conv: a plain copy is inlined (unless its layout
        was changed); padding is computed per parallel tile when the tile reads its own channels
        (depthwise / grouped), else once, as its own parallel loop (the tile would read every channel)."""
        if inline:
            try:
                sch.compute_inline(block)
                return
            except _SCHEDULE_ERRORS:
                pass
        if grouped:
            sch.compute_at(block, anchor, preserve_unit_loops=True)
            loops = sch.get_loops(block)
            sch.vectorize(loops[-1]) if _static(sch.get(loops[-1]).extent) else None
            return
        _parallel_vector(sch, block, lanes)

    # The padding block's if_then_else cannot be inlined into the conv without a select in the
    # vector loop; compute_inline raises for it only when it is not a pure copy, which is the point.


# ------------------------------------------------------------------------------------ reduction
class Reduction(ScheduleRule):
    """A PrimFunc whose one reduction block is its last non-injective stage (see the module docstring)."""

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return _is_cpu(target)

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        reductions = [b for b in _root_blocks(sch) if "R" in _iter_kinds(sch.get(b))]
        if len(reductions) != 1:
            return None
        block = reductions[0]
        name = sch.get(block).name_hint
        # a padding stage stays a stage (a pool's padded input): inlined, its bounds test would sit in
        # the vector loop and turn every load into a masked gather
        padding = {sch.get(b).name_hint for b in _root_blocks(sch) if _is_padding(sch.get(b))}
        try:
            _inline_producers_and_chain(sch, {name} | padding)
            block = sch.get_sblock(name)
            self._schedule(sch, block, vector_lanes(target), padding)
            for pad in padding:
                _parallel_vector(sch, sch.get_sblock(pad), vector_lanes(target))
        except _SCHEDULE_ERRORS as error:
            logger.debug("Reduction does not apply: %s", error)
            return None
        return sch

    @staticmethod
    def _schedule(sch: s_tir.Schedule, block: Any, lanes: int, producers: set) -> None:
        stmt = sch.get(block)
        kinds = _iter_kinds(stmt)
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or set(kinds) - {"S", "R"}:
            raise ValueError("loops do not match the block's iter vars one to one")
        spatial = [loop for loop, k in zip(loops, kinds) if k == "S"]
        reduce = [loop for loop, k in zip(loops, kinds) if k == "R"]
        inner_var = [iv.var for iv, k in zip(stmt.iter_vars, kinds) if k == "S"][-1] if spatial else None
        # vectorise the last spatial loop when the inputs run along it with step 1 (e.g. a sum over
        # NCHW's channels; or one of them does: the dense head's weight runs along the outputs, its
        # input does not). A strided read (a pool's stride 2) would be a gather in every lane: LLVM's
        # own vectoriser does better with the scalar loop (3x on qlnet50's max pool).
        contiguous = inner_var is not None and any(
            len(r.region) and _coefficient(r.region[-1].min, inner_var) == 1 for r in stmt.reads) and not any(
            len(r.region) and _uses(r.region[-1].min, inner_var) and _coefficient(r.region[-1].min, inner_var) != 1
            for r in stmt.reads)
        inner_extent = _static(sch.get(spatial[-1]).extent) if spatial else None
        consumers = [b for b in _root_blocks(sch) if sch.get(b).name_hint not in {stmt.name_hint} | producers]
        if contiguous and inner_extent and inner_extent > 1:
            chunk = _largest_divisor(inner_extent, 4 * lanes)
            s_o, s_i = sch.split(spatial[-1], [None, chunk])
            outer = spatial[:-1] + [s_o]
            sch.reorder(*outer, *reduce, s_i)
            anchor = sch.fuse(*outer) if len(outer) > 1 else outer[0]
            sch.parallel(anchor)
            sch.vectorize(s_i)  # before decompose_reduction: the update block alone has no init
            init = sch.decompose_reduction(block, reduce[0])
            sch.vectorize(sch.get_loops(init)[-1])
        elif len(spatial) > 1 and inner_var is not None and any(
                len(r.region) and _uses(r.region[-1].min, inner_var) for r in stmt.reads):
            # strided along the last loop: rows in parallel, each row's loop nest left to LLVM
            anchor = sch.fuse(*spatial[:-1]) if len(spatial) > 2 else spatial[0]
            sch.parallel(anchor)
        else:
            anchor = sch.fuse(*spatial) if len(spatial) > 1 else (spatial[0] if spatial else None)
            if anchor is not None:
                sch.parallel(anchor)
        for consumer in consumers:  # whatever could not be inlined: computed per tile when possible
            try:
                if anchor is None:
                    raise ValueError("no spatial loop")
                sch.reverse_compute_at(consumer, anchor, preserve_unit_loops=True)
            except _SCHEDULE_ERRORS:
                _parallel_vector(sch, consumer, lanes)


# ---------------------------------------------------------------------------------- elementwise
class Elementwise(ScheduleRule):
    """Injective PrimFuncs (broadcasts, the radial factors' products, reshapes): inlined and
    parallel + vectorised."""

    def is_target_available(self, target: tvm.target.Target) -> bool:
        return _is_cpu(target)

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, _: bool) -> s_tir.Schedule | None:
        if not isinstance(func, tirx.PrimFunc) or not _is_cpu(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = _root_blocks(sch)
        if not blocks or any("R" in _iter_kinds(sch.get(b)) for b in blocks):
            return None
        try:
            _inline_producers_and_chain(sch, set())
            for block in _root_blocks(sch):
                _parallel_vector(sch, block, vector_lanes(target))
        except _SCHEDULE_ERRORS as error:
            logger.debug("Elementwise does not apply: %s", error)
            return None
        return sch
