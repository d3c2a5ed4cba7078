//! `greedy`: global marginal ranking. Every item (a layer's attention, MLP, or both when tied)
//! walks along the lower convex hull of its (params removed, loss) options; the step with the
//! smallest loss increase per parameter removed is taken next (binary heap). For convex curves
//! the hull is every unit step (one KV group / one `mlp_step`), and the greedy prefix is optimal
//! for the amount it removes. Steps that would overshoot `target + granule` are skipped, so the
//! result lands in the budget window whenever the skipped steps are not all needed.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::problem::Problem;
use super::result::Allocation;
use super::spec::Solver;

/// Lower convex hull (by removed params) of `options[start..]`, as option indices, starting at
/// `start`. Collinear points are kept so convex curves keep their unit steps.
pub(crate) fn hull_from(p: &Problem, item: usize, start: usize) -> Vec<usize> {
    let opts = &p.items[item].options;
    let mut h: Vec<usize> = vec![start];
    for j in start + 1..opts.len() {
        if opts[j].removed == opts[*h.last().unwrap()].removed {
            // same removal: keep the lower loss only if it is the hull start's successor
            let k = *h.last().unwrap();
            if h.len() > 1 && opts[j].loss < opts[k].loss {
                h.pop();
            } else {
                continue;
            }
        }
        while h.len() >= 2 {
            let a = opts[h[h.len() - 2]];
            let b = opts[h[h.len() - 1]];
            let c = opts[j];
            // slope(a,b) > slope(a,c)  => b is above the hull
            let lhs = (b.loss - a.loss) * (c.removed - a.removed) as f64;
            let rhs = (c.loss - a.loss) * (b.removed - a.removed) as f64;
            if lhs > rhs {
                h.pop();
            } else {
                break;
            }
        }
        h.push(j);
    }
    h
}

#[derive(PartialEq)]
struct Step {
    slope: f64,
    item: usize,
}
impl Eq for Step {}
impl Ord for Step {
    fn cmp(&self, o: &Self) -> Ordering {
        // min-heap on slope, ties by item index
        o.slope.total_cmp(&self.slope).then(o.item.cmp(&self.item))
    }
}
impl PartialOrd for Step {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// Walk hull steps from `choice` in marginal order until removed >= `lo`, never exceeding
/// `hi`. Returns the removed amount. Items whose next step does not fit are blocked.
pub(crate) fn fill(p: &Problem, choice: &mut [usize], lo: u64, hi: u64) -> u64 {
    let hulls: Vec<Vec<usize>> = (0..p.items.len())
        .map(|i| hull_from(p, i, choice[i]))
        .collect();
    let mut pos = vec![0usize; p.items.len()];
    let mut removed = p.removed_of(choice);
    let mut heap = BinaryHeap::new();
    let slope = |i: usize, k: usize| -> f64 {
        let o = &p.items[i].options;
        let (a, b) = (o[hulls[i][k]], o[hulls[i][k + 1]]);
        (b.loss - a.loss) / (b.removed - a.removed) as f64
    };
    for i in 0..p.items.len() {
        if hulls[i].len() > 1 {
            heap.push(Step {
                slope: slope(i, 0),
                item: i,
            });
        }
    }
    while removed < lo {
        let Some(Step { item: i, .. }) = heap.pop() else {
            break;
        };
        let o = &p.items[i].options;
        let k = pos[i];
        let delta = o[hulls[i][k + 1]].removed - o[hulls[i][k]].removed;
        if removed + delta > hi {
            continue; // blocked: this item's next step overshoots the window
        }
        removed += delta;
        pos[i] = k + 1;
        choice[i] = hulls[i][k + 1];
        if k + 2 < hulls[i].len() {
            heap.push(Step {
                slope: slope(i, k + 1),
                item: i,
            });
        }
    }
    removed
}

/// Best single-item option change that moves `removed` into `[lo, hi]`; applied in place.
pub(crate) fn repair_single(p: &Problem, choice: &mut [usize], lo: u64, hi: u64) -> bool {
    let r = p.removed_of(choice);
    if r >= lo && r <= hi {
        return true;
    }
    let mut best: Option<(f64, usize, usize)> = None;
    for (i, it) in p.items.iter().enumerate() {
        let cur = it.options[choice[i]];
        let base = r - cur.removed;
        for (j, o) in it.options.iter().enumerate() {
            let nr = base + o.removed;
            if nr >= lo && nr <= hi {
                let d = o.loss - cur.loss;
                if best.map_or(true, |(bd, _, _)| d < bd) {
                    best = Some((d, i, j));
                }
            }
        }
    }
    if let Some((_, i, j)) = best {
        choice[i] = j;
        true
    } else {
        false
    }
}

/// Land a starting point in the budget window: greedy fill within `[T, T+granule]`, then a
/// single-item repair, then the wider window `[T, T+granule_max]`.
/// Returns (granule used, extra binding names).
pub(crate) fn land(p: &Problem, choice: &mut [usize]) -> (u64, Vec<&'static str>) {
    let t = p.target;
    let r0 = p.removed_of(choice);
    if r0 > t + p.granule {
        // the lower rate bounds alone remove more than the window allows
        return (r0 - t, vec!["granularity"]);
    }
    let mut trial = choice.to_vec();
    let r = fill(p, &mut trial, t, t + p.granule);
    if r >= t {
        choice.copy_from_slice(&trial);
        return (p.granule, vec![]);
    }
    // The narrow window blocked some steps: try one-item repair from the unblocked walk.
    let mut wide = choice.to_vec();
    fill(p, &mut wide, t, u64::MAX);
    let mut narrow = wide.clone();
    if repair_single(p, &mut narrow, t, t + p.granule) {
        choice.copy_from_slice(&narrow);
        return (p.granule, vec![]);
    }
    let mut w2 = wide.clone();
    if repair_single(p, &mut w2, t, t + p.granule_max) {
        choice.copy_from_slice(&w2);
        return (p.granule_max, vec!["granularity"]);
    }
    let r = p.removed_of(&wide);
    choice.copy_from_slice(&wide);
    (r.saturating_sub(t).max(p.granule), vec!["granularity"])
}

/// `greedy` for the parameter window alone (no KV-cache / FLOPs bound); `p` has passed
/// `check_budget`.
pub(crate) fn solve(p: &Problem) -> Allocation {
    let mut choice = vec![0usize; p.items.len()];
    let (granule, binding) = land(p, &mut choice);
    p.finish(&choice, Solver::Greedy, &binding, vec![], granule)
}
