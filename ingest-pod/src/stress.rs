//! What the randomized stress tests share: a seeded sequence (the same
//! seed, the same run) and how many rounds to run.

/// The next number of a linear congruential sequence (no dependency).
pub(crate) fn lcg(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *seed >> 33
}

/// Rounds a stress test runs: `STRESS_ROUNDS` if set, else `default`.
pub(crate) fn rounds(default: u64) -> u64 {
    std::env::var("STRESS_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}
