//! Kernels vs a naive f64 reference over odd shapes, every kind, both axes, all dtypes.

use super::*;
use half::{bf16, f16};
use proptest::prelude::*;

/// Deterministic pseudo-random values in [-2, 2).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

fn naive(
    w: &[f32],
    g: &[f32],
    h: &[f32],
    rows: usize,
    cols: usize,
    kind: ScoreKind,
    axis: Axis,
    gs: usize,
) -> Vec<f64> {
    let n = if axis == Axis::Rows { rows } else { cols };
    let mut line = vec![0.0f64; n];
    for r in 0..rows {
        for c in 0..cols {
            let i = r * cols + c;
            let (w, g, h) = (w[i] as f64, g[i] as f64, h[i] as f64);
            let e = match kind {
                ScoreKind::Taylor => (w * g).abs(),
                ScoreKind::Vectorize => w * g,
                ScoreKind::Taylor2 => (w * h * w).abs(),
                ScoreKind::TaylorMix => (w * g - 0.5 * w * h * w).abs(),
                ScoreKind::L1 => w.abs(),
                ScoreKind::L2 => w * w,
            };
            line[if axis == Axis::Rows { r } else { c }] += e;
        }
    }
    line.chunks(gs)
        .map(|grp| {
            let s: f64 = grp.iter().sum();
            if kind == ScoreKind::Vectorize {
                s.abs()
            } else {
                s
            }
        })
        .collect()
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let err = (*a as f64 - b).abs();
        assert!(
            err <= tol * (1.0 + b.abs()),
            "{ctx}: [{i}] got {a}, want {b}"
        );
    }
}

/// Every kind at every `(axis, group size)` in `cases` against the f64 reference on the widened
/// values. f32 accumulation error grows ~ sqrt(len); vectorize can cancel, so it is compared to
/// the magnitude of the summed terms.
fn check_against_naive<T: Element>(
    (w, g, h): (&[T], &[T], &[T]),
    rows: usize,
    cols: usize,
    cases: &[(Axis, usize)],
    back: fn(T) -> f32,
    ctx: &str,
) {
    let wide = |x: &[T]| x.iter().map(|v| back(*v)).collect::<Vec<f32>>();
    let (wf, gf, hf) = (wide(w), wide(g), wide(h));
    for kind in ScoreKind::ALL {
        for &(axis, gs) in cases {
            let got = weight_scores(w, Some(g), Some(h), rows, cols, kind, axis, gs).unwrap();
            let want = naive(&wf, &gf, &hf, rows, cols, kind, axis, gs);
            let scale = if axis == Axis::Rows { cols } else { rows } * gs;
            let tol = 1e-5 * (scale as f64).sqrt() * 4.0;
            let ctx = format!(
                "{} {axis:?} {rows}x{cols} gs={gs} {} {ctx}",
                kind.name(),
                T::NAME
            );
            if kind == ScoreKind::Vectorize {
                let mag = naive(&wf, &gf, &hf, rows, cols, ScoreKind::Taylor, axis, gs);
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*a as f64 - b).abs() <= tol * (1.0 + mag[i]),
                        "{ctx}: [{i}] got {a} want {b}"
                    );
                }
            } else {
                assert_close(&got, &want, tol, &ctx);
            }
        }
    }
}

fn check_all<T: Element>(
    rows: usize,
    cols: usize,
    gs_rows: usize,
    gs_cols: usize,
    to_t: fn(f32) -> T,
    back: fn(T) -> f32,
) {
    let n = rows * cols;
    let w: Vec<T> = values(n, 1).into_iter().map(to_t).collect();
    let g: Vec<T> = values(n, 2).into_iter().map(to_t).collect();
    let h: Vec<T> = values(n, 3).into_iter().map(|v| to_t(v.abs())).collect();
    let cases = [
        (Axis::Rows, 1),
        (Axis::Rows, gs_rows),
        (Axis::Cols, 1),
        (Axis::Cols, gs_cols),
    ];
    check_against_naive((&w, &g, &h), rows, cols, &cases, back, "");
}

#[test]
fn f32_matches_naive_on_odd_shapes() {
    for (r, c, gr, gc) in [
        (1, 1, 1, 1),
        (3, 5, 3, 5),
        (17, 33, 17, 11),
        (64, 4099, 8, 4099),
        (130, 70, 13, 7),
        (5000, 3, 1000, 3),
    ] {
        check_all::<f32>(r, c, gr, gc, |v| v, |v| v);
    }
}

#[test]
fn bf16_matches_naive_on_widened_values() {
    for (r, c, gr, gc) in [(7, 9, 7, 3), (48, 4100, 16, 41), (257, 31, 257, 31)] {
        check_all::<bf16>(r, c, gr, gc, bf16::from_f32, bf16::to_f32);
    }
}

/// bfloat16 is read as u32 words: rows when w, g and h sit at the same offset modulo 4 bytes,
/// columns when all three are 4-byte aligned with an even number of columns; element by element
/// otherwise. Slices starting one element in, and odd and even `cols`, cover every case.
#[test]
fn bf16_matches_naive_at_every_alignment() {
    for (rows, cols) in [(9, 1027), (9, 1028), (5, 4100)] {
        let n = rows * cols;
        let buf = |seed| -> Vec<bf16> {
            values(n + 1, seed)
                .into_iter()
                .map(|v| bf16::from_f32(if seed == 3 { v.abs() } else { v }))
                .collect()
        };
        let (wb, gb, hb) = (buf(1), buf(2), buf(3));
        let cases: Vec<(Axis, usize)> = [
            (Axis::Rows, 1),
            (Axis::Rows, 3),
            (Axis::Cols, 1),
            (Axis::Cols, 2),
        ]
        .into_iter()
        .filter(|&(axis, gs)| (if axis == Axis::Rows { rows } else { cols }) % gs == 0)
        .collect();
        for (ow, og, oh) in [(0, 0, 0), (1, 1, 1), (0, 1, 0), (1, 0, 1), (0, 0, 1)] {
            let slices = (&wb[ow..ow + n], &gb[og..og + n], &hb[oh..oh + n]);
            let ctx = format!("offsets ({ow},{og},{oh})");
            check_against_naive(slices, rows, cols, &cases, bf16::to_f32, &ctx);
        }
    }
}

/// Above `SERIAL_BELOW` elements the rows / row blocks run on the pool; below, on this thread.
#[test]
fn pool_and_calling_thread_paths_match_naive() {
    let big = (257, 4099); // 1,053,443 elements: the pool
    assert!(big.0 * big.1 >= kernels::SERIAL_BELOW && 64 * 4099 < kernels::SERIAL_BELOW);
    check_all::<f32>(big.0, big.1, 257, 4099, |v| v, |v| v);
    check_all::<bf16>(big.0, big.1, 1, 1, bf16::from_f32, bf16::to_f32);
    let n = big.0 * big.1;
    let x = values(n, 9);
    let (s, q) = channel_sums(&x, big.0, big.1).unwrap();
    for c in [0, 1, 2047, 4098] {
        let col = (0..big.0).map(|r| x[r * big.1 + c] as f64);
        let (ws, wq) = col.fold((0.0, 0.0), |(a, b), v| (a + v, b + v * v));
        assert!((s[c] as f64 - ws).abs() < 1e-3 && (q[c] as f64 - wq).abs() < 1e-3 * (1.0 + wq));
    }
}

#[test]
fn f16_matches_naive_on_widened_values() {
    for (r, c, gr, gc) in [(7, 9, 7, 3), (40, 4097, 8, 17)] {
        check_all::<f16>(r, c, gr, gc, f16::from_f32, f16::to_f32);
    }
}

#[test]
fn bf16_widening_is_exact() {
    let vals = [0.0f32, -0.0, 1.0, -3.5, 1e-30, 3.0e38, f32::INFINITY];
    for v in vals {
        let b = bf16::from_f32(v);
        let mut out = [0.0f32; 1];
        <bf16 as Element>::widen_into(&[b], &mut out);
        assert_eq!(out[0].to_bits(), b.to_f32().to_bits());
    }
}

#[test]
fn channel_sums_match_naive() {
    let (rows, cols) = (1031, 4099);
    let x = values(rows * cols, 7);
    let (s, q) = channel_sums(&x, rows, cols).unwrap();
    for c in [0, 1, 2047, 4096, 4098] {
        let (mut ws, mut wq) = (0.0f64, 0.0f64);
        for r in 0..rows {
            let v = x[r * cols + c] as f64;
            ws += v;
            wq += v * v;
        }
        assert!(
            (s[c] as f64 - ws).abs() < 1e-3 * (1.0 + wq.sqrt()),
            "sum[{c}]"
        );
        assert!((q[c] as f64 - wq).abs() < 1e-4 * (1.0 + wq), "sumsq[{c}]");
    }
}

#[test]
fn bad_input_is_rejected_with_field_name() {
    let w = vec![1.0f32; 12];
    let err = |r: Result<Vec<f32>, Error>| match r {
        Err(Error::InvalidInput(m)) => m,
        Err(e) => panic!("expected invalid input, got {e:?}"),
        Ok(_) => panic!("expected an error"),
    };
    assert!(err(weight_scores(
        &w,
        None,
        None,
        3,
        4,
        ScoreKind::Taylor,
        Axis::Rows,
        1
    ))
    .starts_with("grad:"));
    assert!(err(weight_scores(
        &w,
        Some(&w),
        None,
        3,
        4,
        ScoreKind::TaylorMix,
        Axis::Rows,
        1
    ))
    .starts_with("fisher:"));
    assert!(err(weight_scores(
        &w,
        None,
        None,
        3,
        5,
        ScoreKind::L1,
        Axis::Rows,
        1
    ))
    .starts_with("weight:"));
    assert!(err(weight_scores(
        &w,
        None,
        None,
        3,
        4,
        ScoreKind::L1,
        Axis::Rows,
        2
    ))
    .starts_with("group_size:"));
    assert!(err(weight_scores(
        &w,
        None,
        None,
        3,
        4,
        ScoreKind::L1,
        Axis::Cols,
        0
    ))
    .starts_with("group_size:"));
    assert!(ScoreKind::parse("taylor3").is_err());
    assert!(Axis::from_index(2).is_err());
}

#[test]
fn empty_matrix_gives_zeros() {
    let w: Vec<f32> = vec![];
    assert_eq!(
        weight_scores(&w, None, None, 0, 5, ScoreKind::L2, Axis::Cols, 1).unwrap(),
        vec![0.0; 5]
    );
    assert_eq!(
        weight_scores(&w, None, None, 4, 0, ScoreKind::L2, Axis::Rows, 2).unwrap(),
        vec![0.0; 2]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn random_shapes_match(rows in 1usize..40, cols in 1usize..300, kind_i in 0usize..6, seed in 0u64..1000) {
        let kind = ScoreKind::ALL[kind_i];
        let n = rows * cols;
        let w = values(n, seed);
        let g = values(n, seed + 1);
        let h: Vec<f32> = values(n, seed + 2).into_iter().map(f32::abs).collect();
        for axis in [Axis::Rows, Axis::Cols] {
            let got = weight_scores(&w, Some(&g), Some(&h), rows, cols, kind, axis, 1).unwrap();
            let want = naive(&w, &g, &h, rows, cols, kind, axis, 1);
            let mag = naive(&w, &g, &h, rows, cols, if kind == ScoreKind::Vectorize { ScoreKind::Taylor } else { kind }, axis, 1);
            for i in 0..got.len() {
                prop_assert!((got[i] as f64 - want[i]).abs() <= 1e-4 * (1.0 + mag[i]));
            }
        }
    }
}

/// Column sums (and the channel statistics) are bit-identical on pools of 1, 2, 3 and 8 threads
/// and on the calling thread: the row blocks and their summation order depend on the shape only.
#[test]
fn column_reductions_do_not_depend_on_the_thread_count() {
    let (rows, cols) = (1031, 4099); // above SERIAL_BELOW: the pool path
    let w = values(rows * cols, 21);
    let g = values(rows * cols, 22);
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| {
                let scores = weight_scores(
                    &w,
                    Some(&g),
                    None,
                    rows,
                    cols,
                    ScoreKind::Taylor,
                    Axis::Cols,
                    1,
                )
                .unwrap();
                let (s, q) = channel_sums(&w, rows, cols).unwrap();
                (scores, s, q)
            })
    };
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let (a, s1, q1) = run(1);
    for threads in [2, 3, 8] {
        let (b, s2, q2) = run(threads);
        assert_eq!(bits(&a), bits(&b), "column scores, {threads} threads");
        assert_eq!(bits(&s1), bits(&s2), "channel sums, {threads} threads");
        assert_eq!(
            bits(&q1),
            bits(&q2),
            "channel sums of squares, {threads} threads"
        );
    }
}
