//! A [`DnsReport`] in frames: the daemon may hold 65,536 names, each with up to
//! `max_ips_per_name` addresses, far more than one [`MAX_FRAME`] of JSON.

use crate::frame::MAX_FRAME;
use crate::messages::{DnsName, DnsReport, Response};

/// Bytes of JSON a part may take by [`json_bound`]: a quarter of a frame, so that even
/// a bound far off leaves room.
pub const DNS_PART_BUDGET: usize = MAX_FRAME / 4;

/// At most how many bytes `name` takes in JSON: every character escaped as `\u00XX`
/// (six bytes), plus the keys and numbers.
fn json_bound(name: &DnsName) -> usize {
    const NAME_FIELDS: usize = 128;
    const ADDRESS_FIELDS: usize = 64;
    let text = name.workload.len() + name.name.len() + name.pattern.len();
    let addresses: usize = name
        .addresses
        .iter()
        .map(|address| 6 * address.address.len() + ADDRESS_FIELDS)
        .sum();
    6 * text + NAME_FIELDS + addresses
}

impl DnsReport {
    /// The frames that carry the report, in order: [`Response::DnsNames`] parts of at most
    /// `budget` bytes of JSON each (a single larger name alone in its part), then
    /// [`Response::Dns`] with the names that are left and the stats.
    pub fn into_frames(self, budget: usize) -> Vec<Response> {
        let DnsReport { names, stats } = self;
        let mut frames = Vec::new();
        let mut part = Vec::new();
        let mut part_size = 0;
        for name in names {
            let size = json_bound(&name);
            if !part.is_empty() && part_size + size > budget {
                frames.push(Response::DnsNames {
                    names: std::mem::take(&mut part),
                });
                part_size = 0;
            }
            part_size += size;
            part.push(name);
        }
        frames.push(Response::Dns(DnsReport { names: part, stats }));
        frames
    }

    /// The whole report again, from the names of the parts before it (in order).
    pub fn after_parts(mut self, mut earlier: Vec<DnsName>) -> DnsReport {
        earlier.append(&mut self.names);
        self.names = earlier;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{DnsAddress, DnsStats};
    use crate::{read_frame, write_frame};

    fn report(names: usize, addresses_each: usize) -> DnsReport {
        DnsReport {
            names: (0..names)
                .map(|i| DnsName {
                    workload: "vendor-agent".into(),
                    name: format!("n{i}.telemetry.vendor.example"),
                    pattern: "*.vendor.example".into(),
                    hits: i as u64,
                    addresses: (0..addresses_each)
                        .map(|j| DnsAddress {
                            address: format!("2001:db8::{i:x}:{j:x}"),
                            expires_in_secs: 300,
                        })
                        .collect(),
                })
                .collect(),
            stats: DnsStats {
                names,
                addresses: names * addresses_each,
                ..DnsStats::default()
            },
        }
    }

    /// Writes the frames as the daemon does and reads them back as egressctl does.
    fn round_trip(frames: &[Response]) -> DnsReport {
        let mut wire = Vec::new();
        for frame in frames {
            write_frame(&mut wire, frame).expect("every frame fits");
        }
        let mut reader = std::io::BufReader::new(wire.as_slice());
        let mut earlier = Vec::new();
        loop {
            match read_frame::<_, Response>(&mut reader).expect("a frame") {
                Some(Response::DnsNames { mut names }) => earlier.append(&mut names),
                Some(Response::Dns(last)) => return last.after_parts(earlier),
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    #[test]
    fn a_small_report_is_one_frame() {
        let original = report(10, 2);
        let frames = original.clone().into_frames(DNS_PART_BUDGET);
        assert_eq!(frames, [Response::Dns(original)]);
    }

    #[test]
    fn a_report_larger_than_a_frame_comes_in_parts_that_fit() {
        // 65,536 names of 4 addresses: about 17 MB of JSON in one frame.
        let original = report(65_536, 4);
        let frames = original.clone().into_frames(DNS_PART_BUDGET);
        assert!(frames.len() > 2, "{} frames", frames.len());
        assert_eq!(round_trip(&frames), original);
    }

    #[test]
    fn a_name_larger_than_the_budget_goes_alone() {
        let original = report(3, 100);
        let frames = original.clone().into_frames(1);
        assert_eq!(frames.len(), 3);
        assert_eq!(round_trip(&frames), original);
    }

    #[test]
    fn the_bound_is_never_below_the_encoding() {
        let mut name = report(1, 3).names.remove(0);
        name.workload = "\u{1}\"\\".repeat(20);
        let encoded = serde_json::to_vec(&name).expect("encode");
        assert!(
            encoded.len() <= json_bound(&name),
            "{} > {}",
            encoded.len(),
            json_bound(&name)
        );
    }
}
