//! Fused one-pass kernels: elementwise score, reduced over a row or a column, in f32.
//!
//! Rows run in parallel (rayon), read in chunks of `CHUNK` elements and reduced with `LANES`
//! independent accumulators so the inner loop vectorises. f32 and bf16 are read in place (bf16
//! rows as `u32` words, two elements each); f16 is widened into a per-task buffer first.

use rayon::prelude::*;

use super::element::{load, Element};

/// Elements widened per step (per tensor): 16 KiB of f32, stays in L1/L2.
const CHUNK: usize = 4096;
/// Independent partial sums in a row reduction: four AVX2 registers, enough to hide the add
/// latency (16 left f32 rows at ~80% of copy bandwidth, 32 reaches it).
const LANES: usize = 32;

/// Elementwise score of one weight entry `w`, its gradient `g` and Fisher diagonal `h`.
pub(crate) trait ElementScore: Send + Sync {
    const USES_G: bool;
    const USES_H: bool;
    fn eval(w: f32, g: f32, h: f32) -> f32;
}

/// `|w·g|` (taylor, LLM-Pruner `param_first`).
pub(crate) struct AbsTaylor;
/// `w·g`, signed (vectorize: the absolute value is taken after the group sum).
pub(crate) struct SignedTaylor;
/// `|w·h·w|` (taylor2, LLM-Pruner `param_second`).
pub(crate) struct SecondOrder;
/// `|w·g − ½·w·h·w|` (taylor-mix, LLM-Pruner `param_mix`).
pub(crate) struct Mixed;
/// `|w|`.
pub(crate) struct L1;
/// `w²`.
pub(crate) struct L2;

impl ElementScore for AbsTaylor {
    const USES_G: bool = true;
    const USES_H: bool = false;
    #[inline(always)]
    fn eval(w: f32, g: f32, _h: f32) -> f32 {
        (w * g).abs()
    }
}
impl ElementScore for SignedTaylor {
    const USES_G: bool = true;
    const USES_H: bool = false;
    #[inline(always)]
    fn eval(w: f32, g: f32, _h: f32) -> f32 {
        w * g
    }
}
impl ElementScore for SecondOrder {
    const USES_G: bool = false;
    const USES_H: bool = true;
    #[inline(always)]
    fn eval(w: f32, _g: f32, h: f32) -> f32 {
        (w * h * w).abs()
    }
}
impl ElementScore for Mixed {
    const USES_G: bool = true;
    const USES_H: bool = true;
    #[inline(always)]
    fn eval(w: f32, g: f32, h: f32) -> f32 {
        (w * g - 0.5 * (w * h * w)).abs()
    }
}
impl ElementScore for L1 {
    const USES_G: bool = false;
    const USES_H: bool = false;
    #[inline(always)]
    fn eval(w: f32, _g: f32, _h: f32) -> f32 {
        w.abs()
    }
}
impl ElementScore for L2 {
    const USES_G: bool = false;
    const USES_H: bool = false;
    #[inline(always)]
    fn eval(w: f32, _g: f32, _h: f32) -> f32 {
        w * w
    }
}

/// Pairwise sum of `LANES` partial sums.
#[inline(always)]
fn fold_lanes(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    acc[0]
}

/// Sum of `O::eval` over a chunk with `LANES` independent accumulators (so the loop vectorises),
/// folded pairwise; reads f32 and bf16 storage directly, f16 after widening into a buffer.
#[inline(always)]
fn reduce_direct<T: Element, O: ElementScore>(w: &[T], g: &[T], h: &[T]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut wc = w.chunks_exact(LANES);
    let mut gc = g.chunks_exact(LANES);
    let mut hc = h.chunks_exact(LANES);
    for ((a, b), c) in (&mut wc).zip(&mut gc).zip(&mut hc) {
        let a: &[T; LANES] = a.try_into().unwrap();
        let b: &[T; LANES] = b.try_into().unwrap();
        let c: &[T; LANES] = c.try_into().unwrap();
        for l in 0..LANES {
            acc[l] += O::eval(a[l].get(), b[l].get(), c[l].get());
        }
    }
    let mut tail = 0.0f32;
    for ((a, b), c) in wc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .zip(hc.remainder())
    {
        tail += O::eval(a.get(), b.get(), c.get());
    }
    fold_lanes(acc) + tail
}

/// Keeps the high bfloat16 of a `u32` word as an f32.
const HIGH_HALF: u32 = 0xFFFF_0000;

/// `O::eval` on the low and on the high bfloat16 of one `u32` word of each of w, g and h. The
/// halves widen to f32 as `word << 16` and `word & HIGH_HALF`: two ALU ops and no lane shuffles
/// (zero-extending u16 lanes costs a shuffle per vector). w, g and h stay paired because all
/// three are split the same way.
#[inline(always)]
fn eval_word<O: ElementScore>(a: u32, b: u32, c: u32) -> (f32, f32) {
    (
        O::eval(
            f32::from_bits(a << 16),
            f32::from_bits(b << 16),
            f32::from_bits(c << 16),
        ),
        O::eval(
            f32::from_bits(a & HIGH_HALF),
            f32::from_bits(b & HIGH_HALF),
            f32::from_bits(c & HIGH_HALF),
        ),
    )
}

/// Row reduction of bfloat16 read as `u32` words, two elements per word (`eval_word`); the
/// order of a sum does not matter. `None` when the three slices sit at different offsets
/// modulo 4 bytes (then the element-wise path runs).
#[inline(always)]
fn reduce_bf16_words<O: ElementScore>(w: &[u16], g: &[u16], h: &[u16]) -> Option<f32> {
    // SAFETY: every bit pattern is a valid u32; `align_to` only reinterprets the aligned middle.
    let (wp, wm, _) = unsafe { w.align_to::<u32>() };
    let (gp, gm, _) = unsafe { g.align_to::<u32>() };
    let (hp, hm, _) = unsafe { h.align_to::<u32>() };
    if gp.len() != wp.len() || hp.len() != wp.len() {
        return None;
    }
    let widen = |x: u16| f32::from_bits((x as u32) << 16);
    let mut tail = 0.0f32;
    let words_end = wp.len() + 2 * wm.len();
    for i in (0..wp.len()).chain(words_end..w.len()) {
        tail += O::eval(widen(w[i]), widen(g[i]), widen(h[i]));
    }
    let mut lo = [0.0f32; LANES];
    let mut hi = [0.0f32; LANES];
    let mut wc = wm.chunks_exact(LANES);
    let mut gc = gm.chunks_exact(LANES);
    let mut hc = hm.chunks_exact(LANES);
    for ((a, b), c) in (&mut wc).zip(&mut gc).zip(&mut hc) {
        let a: &[u32; LANES] = a.try_into().unwrap();
        let b: &[u32; LANES] = b.try_into().unwrap();
        let c: &[u32; LANES] = c.try_into().unwrap();
        for l in 0..LANES {
            let (low, high) = eval_word::<O>(a[l], b[l], c[l]);
            lo[l] += low;
            hi[l] += high;
        }
    }
    for ((a, b), c) in wc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .zip(hc.remainder())
    {
        let (low, high) = eval_word::<O>(*a, *b, *c);
        tail += low;
        tail += high;
    }
    for l in 0..LANES {
        lo[l] += hi[l];
    }
    Some(fold_lanes(lo) + tail)
}

/// `reduce_direct`, with bfloat16 rows read two elements per `u32` word when aligned alike.
#[inline(always)]
fn reduce_rows<T: Element, O: ElementScore>(w: &[T], g: &[T], h: &[T]) -> f32 {
    if let (Some(wb), Some(gb), Some(hb)) = (T::bf16_bits(w), T::bf16_bits(g), T::bf16_bits(h)) {
        if let Some(total) = reduce_bf16_words::<O>(wb, gb, hb) {
            return total;
        }
    }
    reduce_direct::<T, O>(w, g, h)
}

/// `x` as `u32` words when it starts 4-byte aligned and has an even length, else `None`.
#[inline(always)]
fn as_words(x: &[u16]) -> Option<&[u32]> {
    // SAFETY: every bit pattern is a valid u32; `align_to` only reinterprets the aligned middle.
    let (prefix, words, suffix) = unsafe { x.align_to::<u32>() };
    (prefix.is_empty() && suffix.is_empty()).then_some(words)
}

/// The `u32` words of a bfloat16 slice already checked by `as_words`.
#[inline(always)]
fn bf16_words<T: Element>(t: &[T]) -> &[u32] {
    T::bf16_bits(t)
        .and_then(as_words)
        .expect("checked before the loop: bfloat16, aligned, even length")
}

/// Column accumulation of bfloat16 read as `u32` words (`eval_word`): word `k` adds its low
/// element into `even[k]` and its high element into `odd[k]`.
#[inline(always)]
fn accumulate_bf16_words<O: ElementScore>(
    even: &mut [f32],
    odd: &mut [f32],
    w: &[u32],
    g: &[u32],
    h: &[u32],
) {
    for ((((e, o), a), b), c) in even.iter_mut().zip(odd.iter_mut()).zip(w).zip(g).zip(h) {
        let (low, high) = eval_word::<O>(*a, *b, *c);
        *e += low;
        *o += high;
    }
}

/// `acc[c] += O::eval(w[c], g[c], h[c])`, reading the storage type directly.
#[inline(always)]
fn accumulate_direct<T: Element, O: ElementScore>(acc: &mut [f32], w: &[T], g: &[T], h: &[T]) {
    for (((s, a), b), c) in acc.iter_mut().zip(w).zip(g).zip(h) {
        *s += O::eval(a.get(), b.get(), c.get());
    }
}

/// Whether this CPU runs the AVX2 + FMA builds of the task bodies (the wheel targets baseline
/// x86-64, so wider SIMD is chosen at run time, once per task).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn use_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Per-task scratch for widening up to three tensors.
struct Scratch {
    w: Vec<f32>,
    g: Vec<f32>,
    h: Vec<f32>,
}

impl Scratch {
    fn new<T: Element>() -> Self {
        let n = if T::DIRECT { 0 } else { CHUNK };
        Scratch {
            w: vec![0.0; n],
            g: vec![0.0; n],
            h: vec![0.0; n],
        }
    }
}

/// Loads the f32 views of `w`, `g`, `h` over `range` (unused tensors alias `w`).
#[inline(always)]
fn load3<'a, T: Element, O: ElementScore>(
    s: &'a mut Scratch,
    w: &'a [T],
    g: &'a [T],
    h: &'a [T],
    range: std::ops::Range<usize>,
) -> (&'a [f32], &'a [f32], &'a [f32]) {
    let Scratch {
        w: bw,
        g: bg,
        h: bh,
    } = s;
    let wf = load(&w[range.clone()], bw);
    let gf = if O::USES_G {
        load(&g[range.clone()], bg)
    } else {
        wf
    };
    let hf = if O::USES_H { load(&h[range], bh) } else { wf };
    (wf, gf, hf)
}

/// Matrices with fewer elements than this are scored on the calling thread alone: right after
/// a torch op (the gradient's backward), torch's OpenMP workers still spin on the cores, and
/// handing a few MiB to the pool then costs more than it saves (SmolLM2's 1536×576 MLP
/// weights: 0.42-0.59 ms on this thread vs 0.64-0.74 ms through the pool, on 2 cores).
pub(crate) const SERIAL_BELOW: usize = 1 << 20;

/// Tasks for `n` lines of `rows × cols`: one (run here) below `SERIAL_BELOW`, else a few per
/// thread for load balance, never more than `n`.
fn tasks_for(n: usize, rows: usize, cols: usize) -> usize {
    if rows.saturating_mul(cols) < SERIAL_BELOW {
        return 1;
    }
    let threads = rayon::current_num_threads().max(1);
    (threads * 4).min(n).max(1)
}

/// Elements per row block of a column reduction.
const COLUMN_BLOCK_ELEMENTS: usize = 1 << 18;
/// At most this many row blocks (partial column vectors) per column reduction.
const MAX_COLUMN_BLOCKS: usize = 64;

/// Row blocks of a column reduction over `rows × cols`, fixed by the shape alone: never by the
/// thread count, so the partial sums and the order they are added in are the same on any pool.
fn column_blocks(rows: usize, cols: usize) -> usize {
    (rows.saturating_mul(cols) / COLUMN_BLOCK_ELEMENTS).clamp(1, rows.clamp(1, MAX_COLUMN_BLOCKS))
}

/// `map` over `blocks` (≥ 1) row blocks (in parallel when `parallel`), then the partial results
/// folded by `reduce` in block order: the same result whatever the number of threads.
fn map_reduce<R: Send>(
    blocks: usize,
    parallel: bool,
    map: impl Fn(usize) -> R + Sync + Send,
    reduce: impl Fn(R, R) -> R,
) -> R {
    let parts: Vec<R> = if parallel && blocks > 1 {
        (0..blocks).into_par_iter().map(map).collect()
    } else {
        (0..blocks).map(map).collect()
    };
    parts
        .into_iter()
        .reduce(reduce)
        .expect("at least one block")
}

/// Row sums of rows `first_row..first_row + out.len()` into `out`: one `per_row` task.
#[inline(always)]
fn score_rows<T: Element, O: ElementScore>(
    w: &[T],
    g: &[T],
    h: &[T],
    cols: usize,
    first_row: usize,
    out: &mut [f32],
) {
    let mut scratch = Scratch::new::<T>();
    for (i, o) in out.iter_mut().enumerate() {
        let base = (first_row + i) * cols;
        let mut total = 0.0f32;
        let mut c0 = 0;
        while c0 < cols {
            let c1 = (c0 + CHUNK).min(cols);
            let r = base + c0..base + c1;
            if T::DIRECT {
                total += reduce_rows::<T, O>(&w[r.clone()], &g[r.clone()], &h[r]);
            } else {
                let (wf, gf, hf) = load3::<T, O>(&mut scratch, w, g, h, r);
                total += reduce_direct::<f32, O>(wf, gf, hf);
            }
            c0 = c1;
        }
        *o = total;
    }
}

/// Column sums over `rows`: one `per_col` block (`words`: the layout `per_col` describes).
#[inline(always)]
fn score_cols<T: Element, O: ElementScore>(
    w: &[T],
    g: &[T],
    h: &[T],
    cols: usize,
    rows: std::ops::Range<usize>,
    words: bool,
) -> Vec<f32> {
    let mut scratch = Scratch::new::<T>();
    let mut acc = vec![0.0f32; cols];
    for r in rows {
        let base = r * cols;
        let mut c0 = 0;
        while c0 < cols {
            let c1 = (c0 + CHUNK).min(cols);
            let r = base + c0..base + c1;
            if words {
                let (even, odd) = acc.split_at_mut(cols / 2);
                accumulate_bf16_words::<O>(
                    &mut even[c0 / 2..c1 / 2],
                    &mut odd[c0 / 2..c1 / 2],
                    bf16_words(&w[r.clone()]),
                    bf16_words(&g[r.clone()]),
                    bf16_words(&h[r]),
                );
            } else if T::DIRECT {
                accumulate_direct::<T, O>(&mut acc[c0..c1], &w[r.clone()], &g[r.clone()], &h[r]);
            } else {
                let (wf, gf, hf) = load3::<T, O>(&mut scratch, w, g, h, r);
                accumulate_direct::<f32, O>(&mut acc[c0..c1], wf, gf, hf);
            }
            c0 = c1;
        }
    }
    acc
}

/// `score_rows` compiled for AVX2 + FMA (same code; the compiler widens the lanes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_rows_avx2<T: Element, O: ElementScore>(
    w: &[T],
    g: &[T],
    h: &[T],
    cols: usize,
    first_row: usize,
    out: &mut [f32],
) {
    score_rows::<T, O>(w, g, h, cols, first_row, out)
}

/// `score_cols` compiled for AVX2 + FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_cols_avx2<T: Element, O: ElementScore>(
    w: &[T],
    g: &[T],
    h: &[T],
    cols: usize,
    rows: std::ops::Range<usize>,
    words: bool,
) -> Vec<f32> {
    score_cols::<T, O>(w, g, h, cols, rows, words)
}

/// One value per row: `out[r] = Σ_c O::eval(w[r,c], g[r,c], h[r,c])`.
pub(crate) fn per_row<T: Element, O: ElementScore>(
    w: &[T],
    g: &[T],
    h: &[T],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    let mut out = vec![0.0f32; rows];
    if rows == 0 || cols == 0 {
        return out;
    }
    let tasks = tasks_for(rows, rows, cols);
    let rows_per_task = rows.div_ceil(tasks);
    let task = |(t, out_rows): (usize, &mut [f32])| {
        let first_row = t * rows_per_task;
        #[cfg(target_arch = "x86_64")]
        if use_avx2() {
            // SAFETY: the CPU reports AVX2 and FMA.
            return unsafe { score_rows_avx2::<T, O>(w, g, h, cols, first_row, out_rows) };
        }
        score_rows::<T, O>(w, g, h, cols, first_row, out_rows)
    };
    if tasks == 1 {
        task((0, &mut out));
    } else {
        out.par_chunks_mut(rows_per_task).enumerate().for_each(task);
    }
    out
}

/// One value per column: `out[c] = Σ_r O::eval(w[r,c], g[r,c], h[r,c])`.
/// Row blocks (fixed by the shape, [`column_blocks`]) are reduced in parallel into partial column
/// vectors, then summed in block order, so the result does not depend on the thread count. bfloat16 with an
/// even number of columns and 4-byte aligned storage is read as `u32` words into accumulators
/// split by column parity (`[even columns | odd columns]`), interleaved once at the end.
pub(crate) fn per_col<T: Element, O: ElementScore>(
    w: &[T],
    g: &[T],
    h: &[T],
    rows: usize,
    cols: usize,
) -> Vec<f32> {
    if rows == 0 || cols == 0 {
        return vec![0.0f32; cols];
    }
    let words = cols % 2 == 0
        && [w, g, h]
            .iter()
            .all(|t| T::bf16_bits(t).and_then(as_words).is_some());
    let rows_per_block = rows.div_ceil(column_blocks(rows, cols));
    let acc = map_reduce(
        rows.div_ceil(rows_per_block),
        tasks_for(rows, rows, cols) > 1,
        |b| {
            let block = b * rows_per_block..((b + 1) * rows_per_block).min(rows);
            #[cfg(target_arch = "x86_64")]
            if use_avx2() {
                // SAFETY: the CPU reports AVX2 and FMA.
                return unsafe { score_cols_avx2::<T, O>(w, g, h, cols, block, words) };
            }
            score_cols::<T, O>(w, g, h, cols, block, words)
        },
        |mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        },
    );
    if !words {
        return acc;
    }
    let (even, odd) = acc.split_at(cols / 2);
    even.iter().zip(odd).flat_map(|(e, o)| [*e, *o]).collect()
}

/// Per-channel (column) sum and sum of squares of `x` (`rows` tokens × `cols` channels).
pub(crate) fn column_sum_sumsq<T: Element>(
    x: &[T],
    rows: usize,
    cols: usize,
) -> (Vec<f32>, Vec<f32>) {
    if rows == 0 || cols == 0 {
        return (vec![0.0; cols], vec![0.0; cols]);
    }
    let rows_per_block = rows.div_ceil(column_blocks(rows, cols));
    map_reduce(
        rows.div_ceil(rows_per_block),
        tasks_for(rows, rows, cols) > 1,
        |b| {
            let mut buf = if T::as_f32(&[]).is_some() {
                Vec::new()
            } else {
                vec![0.0f32; CHUNK]
            };
            let mut sum = vec![0.0f32; cols];
            let mut sumsq = vec![0.0f32; cols];
            let r1 = ((b + 1) * rows_per_block).min(rows);
            for r in b * rows_per_block..r1 {
                let base = r * cols;
                let mut c0 = 0;
                while c0 < cols {
                    let c1 = (c0 + CHUNK).min(cols);
                    let xf = load(&x[base + c0..base + c1], &mut buf);
                    for ((s, q), v) in sum[c0..c1].iter_mut().zip(&mut sumsq[c0..c1]).zip(xf) {
                        *s += *v;
                        *q += *v * *v;
                    }
                    c0 = c1;
                }
            }
            (sum, sumsq)
        },
        |(mut s, mut q), (s2, q2)| {
            s.iter_mut().zip(&s2).for_each(|(x, y)| *x += y);
            q.iter_mut().zip(&q2).for_each(|(x, y)| *x += y);
            (s, q)
        },
    )
}
