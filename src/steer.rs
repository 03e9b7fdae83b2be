//! Steering: which backends a client should try, best first.
//!
//! A pure function of (client location, session key, backend states), so the
//! same key lands on the same backend from any router instance that shares
//! the configuration. Two steps:
//!
//! 1. **Region order.** An explicit country, then continent, mapping from the
//!    config comes first when the client matches one. The remaining regions
//!    follow by great-circle distance from the client: its coordinates when
//!    the database has them, else the centre of its continent, else the first
//!    mapped region, else the default region (which then also comes first).
//! 2. **Backends inside a region** are ordered by weighted rendezvous
//!    (highest-random-weight) hashing of the session key against each
//!    backend's id. Only available backends (healthy, not draining, not full)
//!    take part, so removing one backend re-pins only the keys that were on
//!    it, and a region with no available backend spills to the next region.

use std::collections::HashMap;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use crate::geo::{Code, Location};

/// Rough centres of MaxMind's continent codes, for clients whose record has a
/// continent but no coordinates (Country databases, anycast ranges).
const CONTINENT_CENTRES: &[(&str, f64, f64)] = &[
    ("AF", 2.0, 21.0),
    ("AN", -80.0, 0.0),
    ("AS", 34.0, 100.0),
    ("EU", 50.0, 10.0),
    ("NA", 45.0, -100.0),
    ("OC", -25.0, 135.0),
    ("SA", -15.0, -60.0),
];

/// The region part of the steering configuration.
#[derive(Debug, Clone)]
pub struct Policy {
    /// (latitude, longitude) of each region, by region index.
    regions: Vec<(f64, f64)>,
    /// Each region as a unit vector: ordering regions by distance is then a
    /// dot product each, with no trigonometry per new session.
    units: Vec<[f64; 3]>,
    /// Region used when nothing is known about the client.
    pub default_region: usize,
    /// Country -> ordered region indices.
    pub countries: HashMap<Code, Vec<usize>>,
    /// Continent -> ordered region indices.
    pub continents: HashMap<Code, Vec<usize>>,
}

/// What steering needs to know about one backend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackendView {
    pub region: usize,
    /// Relative share of its region's keys (>= 1).
    pub weight: u32,
    /// Hash of the backend id: the backend's identity for rendezvous hashing.
    pub id_hash: u64,
    /// Healthy, not draining, below its session cap, not excluded.
    pub available: bool,
}

/// The stable identity hash of a backend id (the same on every instance).
pub fn id_hash(id: &str) -> u64 {
    xxh3_64(id.as_bytes())
}

fn continent_centre(code: Code) -> Option<(f64, f64)> {
    CONTINENT_CENTRES
        .iter()
        .find(|(c, _, _)| *c == code.as_str())
        .map(|&(_, lat, lon)| (lat, lon))
}

/// A point on the unit sphere.
fn unit_vector((lat, lon): (f64, f64)) -> [f64; 3] {
    let (lat, lon) = (lat.to_radians(), lon.to_radians());
    [lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()]
}

impl Policy {
    /// A policy over regions at these (latitude, longitude) points.
    pub fn new(
        regions: Vec<(f64, f64)>,
        default_region: usize,
        countries: HashMap<Code, Vec<usize>>,
        continents: HashMap<Code, Vec<usize>>,
    ) -> Policy {
        Policy {
            units: regions.iter().copied().map(unit_vector).collect(),
            regions,
            default_region,
            countries,
            continents,
        }
    }

    /// Every region index, in the order a client at `location` should try them.
    pub fn region_order(&self, location: &Location) -> Vec<usize> {
        let explicit: &[usize] = location
            .country
            .and_then(|c| self.countries.get(&c))
            .or_else(|| location.continent.and_then(|c| self.continents.get(&c)))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let anchor_region = explicit.first().copied().unwrap_or(self.default_region);
        let anchor = unit_vector(
            location
                .coordinates
                .or_else(|| location.continent.and_then(continent_centre))
                .unwrap_or(self.regions[anchor_region]),
        );

        let mut order = Vec::with_capacity(self.regions.len());
        for &r in explicit {
            if !order.contains(&r) {
                order.push(r);
            }
        }
        let knows_nothing = explicit.is_empty()
            && location.coordinates.is_none()
            && location.continent.and_then(continent_centre).is_none();
        if knows_nothing {
            order.push(self.default_region);
        }
        // The great-circle distance falls as the dot product of the unit
        // vectors rises: sort by it, largest (closest) first.
        let mut rest: Vec<(f64, usize)> = (0..self.regions.len())
            .filter(|r| !order.contains(r))
            .map(|r| {
                let u = self.units[r];
                (anchor[0] * u[0] + anchor[1] * u[1] + anchor[2] * u[2], r)
            })
            .collect();
        rest.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        order.extend(rest.into_iter().map(|(_, r)| r));
        order
    }

    /// Indices into `backends` of every available backend, best first:
    /// regions in [`Policy::region_order`], and inside a region by weighted
    /// rendezvous score for `key`.
    pub fn rank(&self, location: &Location, key: &str, backends: &[BackendView]) -> Vec<usize> {
        self.rank_first(location, key, backends, usize::MAX)
    }

    /// [`Policy::rank`], stopping once `limit` backends are ranked: a new
    /// session tries only a few, so regions past those are never scored.
    pub fn rank_first(
        &self,
        location: &Location,
        key: &str,
        backends: &[BackendView],
        limit: usize,
    ) -> Vec<usize> {
        self.rank_first_where(location, key, backends, limit, |i| backends[i].available)
    }

    /// [`Policy::rank_first`] with availability asked of `available(index)`
    /// instead of read from the views, and only for backends in the
    /// regions it gets to (checking a live backend costs a few atomics).
    pub fn rank_first_where(
        &self,
        location: &Location,
        key: &str,
        backends: &[BackendView],
        limit: usize,
        available: impl Fn(usize) -> bool,
    ) -> Vec<usize> {
        let mut ranked = Vec::new();
        let mut in_region: Vec<(f64, usize)> = Vec::new();
        for region in self.region_order(location) {
            if ranked.len() >= limit {
                break;
            }
            in_region.clear();
            in_region.extend(
                backends
                    .iter()
                    .enumerate()
                    .filter(|&(i, b)| b.region == region && available(i))
                    .map(|(i, b)| (rendezvous_score(key, b), i)),
            );
            in_region.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            ranked.extend(in_region.iter().map(|&(_, i)| i));
        }
        ranked.truncate(limit);
        ranked
    }
}

/// Weighted rendezvous score: `-weight / ln(u)` with `u` uniform in (0, 1]
/// from the hash of (key, backend). The highest score wins; a backend's
/// chance of winning is proportional to its weight.
pub fn rendezvous_score(key: &str, backend: &BackendView) -> f64 {
    let h = xxh3_64_with_seed(key.as_bytes(), backend.id_hash);
    // 53 random bits, shifted off zero so ln(u) < 0 is always finite.
    let u = ((h >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    if u >= 1.0 {
        return f64::INFINITY;
    }
    -(backend.weight as f64) / u.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EARTH_RADIUS_KM: f64 = 6371.0;

    /// Great-circle distance in kilometres (haversine).
    pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
        let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
        let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
        let h = ((lat2 - lat1) / 2.0).sin().powi(2)
            + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
        2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
    }

    // eu (Frankfurt), us (Virginia), ap (Singapore)
    fn policy() -> Policy {
        Policy::new(
            vec![(50.1, 8.7), (38.9, -77.0), (1.35, 103.8)],
            0,
            HashMap::new(),
            HashMap::new(),
        )
    }

    fn at(lat: f64, lon: f64) -> Location {
        Location {
            coordinates: Some((lat, lon)),
            ..Location::default()
        }
    }

    fn backend(region: usize, weight: u32, id: &str) -> BackendView {
        BackendView {
            region,
            weight,
            id_hash: id_hash(id),
            available: true,
        }
    }

    #[test]
    fn distance_is_great_circle() {
        // London to New York is about 5,570 km.
        let d = distance_km((51.5074, -0.1278), (40.7128, -74.0060));
        assert!((d - 5570.0).abs() < 20.0, "{d}");
        assert_eq!(distance_km((10.0, 10.0), (10.0, 10.0)), 0.0);
    }

    #[test]
    fn regions_by_distance() {
        let p = policy();
        assert_eq!(p.region_order(&at(51.5, -0.09)), vec![0, 1, 2]); // London
        assert_eq!(p.region_order(&at(47.25, -122.3)), vec![1, 0, 2]); // Milton, WA
        assert_eq!(p.region_order(&at(35.7, 139.7)), vec![2, 0, 1]); // Tokyo
    }

    #[test]
    fn unknown_location_starts_at_the_default_region() {
        let mut p = policy();
        p.default_region = 1;
        assert_eq!(p.region_order(&Location::default())[0], 1);
    }

    #[test]
    fn continent_without_coordinates_uses_its_centre() {
        let p = policy();
        let loc = Location {
            continent: Code::new("AS"),
            ..Location::default()
        };
        assert_eq!(p.region_order(&loc)[0], 2);
    }

    #[test]
    fn explicit_country_map_wins_over_distance() {
        let mut p = policy();
        p.countries.insert(Code::new("GB").unwrap(), vec![1]);
        let mut loc = at(51.5, -0.09);
        loc.country = Code::new("GB");
        assert_eq!(p.region_order(&loc), vec![1, 0, 2]);
        // The continent map applies when no country entry matches.
        p.continents.insert(Code::new("EU").unwrap(), vec![2, 1]);
        loc.country = Code::new("FR");
        loc.continent = Code::new("EU");
        assert_eq!(p.region_order(&loc), vec![2, 1, 0]);
    }

    #[test]
    fn weights_share_keys_proportionally() {
        let p = policy();
        let backends = [backend(0, 100, "eu-1"), backend(0, 300, "eu-2")];
        let n = 20_000;
        let on_second = (0..n)
            .filter(|i| p.rank(&at(51.5, 0.0), &format!("k{i}"), &backends)[0] == 1)
            .count();
        let share = on_second as f64 / n as f64;
        assert!((share - 0.75).abs() < 0.02, "share {share}");
    }

    fn arb_backends() -> impl Strategy<Value = Vec<BackendView>> {
        prop::collection::vec((0usize..3, 1u32..500, any::<bool>()), 1..12).prop_map(|v| {
            v.into_iter()
                .enumerate()
                .map(|(i, (region, weight, available))| BackendView {
                    available,
                    ..backend(region, weight, &format!("b{i}"))
                })
                .collect()
        })
    }

    fn arb_location() -> impl Strategy<Value = Location> {
        (-90.0f64..90.0, -180.0f64..180.0).prop_map(|(lat, lon)| at(lat, lon))
    }

    proptest! {
        #[test]
        fn removing_a_backend_repins_only_its_own_keys(
            backends in arb_backends(),
            location in arb_location(),
            keys in prop::collection::vec("[a-z0-9]{1,16}", 1..50),
            removed in any::<prop::sample::Index>(),
        ) {
            let p = policy();
            let removed = removed.index(backends.len());
            let mut after = backends.clone();
            after[removed].available = false;
            for key in &keys {
                let before = p.rank(&location, key, &backends).first().copied();
                let now = p.rank(&location, key, &after).first().copied();
                if before != Some(removed) {
                    prop_assert_eq!(before, now, "key {} moved though its backend stayed", key);
                }
            }
        }

        #[test]
        fn unavailable_regions_spill_to_the_next_closest(
            backends in arb_backends(),
            location in arb_location(),
            key in "[a-z0-9]{1,16}",
        ) {
            let p = policy();
            let ranked = p.rank(&location, &key, &backends);
            let order = p.region_order(&location);
            let first_region_with_capacity = order
                .iter()
                .copied()
                .find(|&r| backends.iter().any(|b| b.available && b.region == r));
            prop_assert_eq!(ranked.first().map(|&i| backends[i].region), first_region_with_capacity);
            // Every available backend appears exactly once, none other does.
            let mut seen = ranked.clone();
            seen.sort_unstable();
            let expected: Vec<usize> = (0..backends.len()).filter(|&i| backends[i].available).collect();
            prop_assert_eq!(seen, expected);
            // Regions appear in region order, never interleaved.
            let regions: Vec<usize> = ranked.iter().map(|&i| backends[i].region).collect();
            let positions: Vec<usize> = regions
                .iter()
                .map(|r| order.iter().position(|o| o == r).unwrap())
                .collect();
            prop_assert!(positions.windows(2).all(|w| w[0] <= w[1]));
        }

        #[test]
        fn a_limited_ranking_is_the_head_of_the_full_one(
            backends in arb_backends(),
            location in arb_location(),
            key in "[a-z0-9]{1,16}",
            limit in 0usize..6,
        ) {
            let p = policy();
            let full = p.rank(&location, &key, &backends);
            let head = p.rank_first(&location, &key, &backends, limit);
            prop_assert_eq!(&full[..limit.min(full.len())], &head[..]);
        }

        #[test]
        fn regions_are_ordered_by_great_circle_distance(location in arb_location()) {
            let p = policy();
            let here = location.coordinates.unwrap();
            let distances: Vec<f64> = p
                .region_order(&location)
                .iter()
                .map(|&r| distance_km(here, p.regions[r]))
                .collect();
            prop_assert!(distances.windows(2).all(|w| w[0] <= w[1] + 1e-6), "{distances:?}");
        }

        #[test]
        fn ranking_is_deterministic(backends in arb_backends(), location in arb_location(), key in ".{0,20}") {
            let p = policy();
            prop_assert_eq!(p.rank(&location, &key, &backends), p.rank(&location, &key, &backends.clone()));
        }
    }
}
