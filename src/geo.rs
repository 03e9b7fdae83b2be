//! GeoIP: a client address to a [`Location`] (coordinates, country,
//! continent), read from a MaxMind DB file (GeoIP2 / GeoLite2, City or
//! Country schema).
//!
//! Only the three fields steering needs are decoded, so a lookup allocates
//! nothing. Private and loopback addresses are not looked up. What to do
//! with a partial or empty location (Country schema, anycast ranges, unknown
//! addresses) is steering's business, not ours.

use std::net::IpAddr;
use std::path::Path;

use maxminddb::Reader;
use serde::Deserialize;

/// A two-letter code (ISO 3166 country or MaxMind continent), upper case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Code([u8; 2]);

impl Code {
    /// Parse a two-letter ASCII code; anything else is `None`.
    pub fn new(s: &str) -> Option<Code> {
        match s.as_bytes() {
            [a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                Some(Code([a.to_ascii_uppercase(), b.to_ascii_uppercase()]))
            }
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("codes are ASCII letters")
    }
}

/// Where a client is, as far as the database knows. Every field may be
/// missing.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Location {
    /// (latitude, longitude) in degrees.
    pub coordinates: Option<(f64, f64)>,
    pub country: Option<Code>,
    pub continent: Option<Code>,
}

/// How a lookup went, for `wsrouter_geoip_lookups_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupResult {
    /// The database had a record for the address.
    Hit,
    /// The address is public but the database has nothing for it.
    Miss,
    /// Loopback, private, link-local or otherwise not routable: not looked up.
    Private,
}

impl LookupResult {
    pub fn as_label(self) -> &'static str {
        match self {
            LookupResult::Hit => "hit",
            LookupResult::Miss => "miss",
            LookupResult::Private => "private",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GeoError {
    #[error("cannot open GeoIP database {path}: {source}")]
    Open {
        path: String,
        source: maxminddb::MaxMindDbError,
    },
    #[error(
        "GeoIP database {path} has type {kind:?}; expected a GeoIP2/GeoLite2 City or Country database"
    )]
    WrongKind { path: String, kind: String },
}

/// An open MaxMind database. `Send + Sync`: share it in an `Arc`.
pub struct GeoDb {
    reader: Reader<Vec<u8>>,
    kind: String,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb").field("kind", &self.kind).finish()
    }
}

#[derive(Deserialize, Default)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<Named<'a>>,
    #[serde(borrow, default)]
    continent: Option<Continent<'a>>,
    #[serde(default)]
    location: Option<Coordinates>,
}

#[derive(Deserialize)]
struct Named<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Continent<'a> {
    #[serde(borrow, default)]
    code: Option<&'a str>,
}

#[derive(Deserialize)]
struct Coordinates {
    latitude: Option<f64>,
    longitude: Option<f64>,
}

impl GeoDb {
    /// Open and check a database file (read into memory).
    pub fn open(path: &Path) -> Result<GeoDb, GeoError> {
        let shown = path.display().to_string();
        let reader = Reader::open_readfile(path).map_err(|source| GeoError::Open {
            path: shown.clone(),
            source,
        })?;
        let kind = reader.metadata().database_type.clone();
        if !(kind.contains("City") || kind.contains("Country")) {
            return Err(GeoError::WrongKind { path: shown, kind });
        }
        Ok(GeoDb { reader, kind })
    }

    /// The database type from its metadata, e.g. `GeoLite2-City`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Look an address up. IPv4-mapped IPv6 addresses are treated as IPv4.
    /// A corrupt record counts as a miss rather than failing the session.
    pub fn lookup(&self, ip: IpAddr) -> (Location, LookupResult) {
        let ip = ip.to_canonical();
        if !is_public(ip) {
            return (Location::default(), LookupResult::Private);
        }
        let record = match self.reader.lookup(ip).and_then(|r| r.decode::<Record>()) {
            Ok(Some(record)) => record,
            Ok(None) | Err(_) => return (Location::default(), LookupResult::Miss),
        };
        let coordinates = match record.location {
            Some(Coordinates {
                latitude: Some(lat),
                longitude: Some(lon),
            }) if lat.is_finite() && lon.is_finite() => Some((lat, lon)),
            _ => None,
        };
        let location = Location {
            coordinates,
            country: record.country.and_then(|c| c.iso_code).and_then(Code::new),
            continent: record.continent.and_then(|c| c.code).and_then(Code::new),
        };
        let result = if location == Location::default() {
            LookupResult::Miss
        } else {
            LookupResult::Hit
        };
        (location, result)
    }
}

/// Whether an address could be in a GeoIP database at all.
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(name: &str) -> GeoDb {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("geoip")
            .join(name);
        GeoDb::open(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn city_database_gives_coordinates_country_and_continent() {
        let db = db("GeoLite2-City-Test.mmdb");
        let (loc, result) = db.lookup("81.2.69.142".parse().unwrap());
        assert_eq!(result, LookupResult::Hit);
        assert_eq!(loc.country.unwrap().as_str(), "GB");
        assert_eq!(loc.continent.unwrap().as_str(), "EU");
        let (lat, lon) = loc.coordinates.unwrap();
        assert!((lat - 51.5142).abs() < 1e-3 && (lon + 0.0931).abs() < 1e-3);

        let (loc, _) = db.lookup("::ffff:216.160.83.56".parse().unwrap());
        assert_eq!(loc.country.unwrap().as_str(), "US");
        let (loc, _) = db.lookup("2001:218::1".parse().unwrap());
        assert_eq!(loc.country.unwrap().as_str(), "JP");
    }

    #[test]
    fn private_and_unknown_addresses() {
        let db = db("GeoLite2-City-Test.mmdb");
        assert_eq!(
            db.lookup("127.0.0.1".parse().unwrap()).1,
            LookupResult::Private
        );
        assert_eq!(
            db.lookup("10.1.2.3".parse().unwrap()).1,
            LookupResult::Private
        );
        assert_eq!(db.lookup("::1".parse().unwrap()).1, LookupResult::Private);
        let (loc, result) = db.lookup("1.1.1.1".parse().unwrap());
        assert_eq!((loc, result), (Location::default(), LookupResult::Miss));
    }

    #[test]
    fn record_without_country_keeps_continent() {
        let db = db("GeoLite2-City-Test.mmdb");
        let (loc, result) = db.lookup("2a02:d500::1".parse().unwrap());
        assert_eq!(result, LookupResult::Hit);
        assert_eq!(loc.country, None);
        assert_eq!(loc.continent.unwrap().as_str(), "EU");
    }

    #[test]
    fn codes_are_two_ascii_letters() {
        assert_eq!(Code::new("gb").unwrap().as_str(), "GB");
        assert!(Code::new("GBR").is_none());
        assert!(Code::new("1A").is_none());
    }
}
