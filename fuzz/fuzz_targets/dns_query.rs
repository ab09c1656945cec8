//! Any datagram through the DNS server's packet path (parse, zone lookup, answer): it must
//! not panic, and an answer must be a response to the query's ID within the transport limit.
#![no_main]

use std::sync::OnceLock;

use berth_dns::{DEFAULT_SUFFIX, Step, Zone, respond};
use libfuzzer_sys::fuzz_target;

fn zone() -> &'static Zone {
    static ZONE: OnceLock<Zone> = OnceLock::new();
    ZONE.get_or_init(|| {
        let z = Zone::new(
            "blue",
            DEFAULT_SUFFIX,
            vec![
                "10.91.0.0/24".parse().unwrap(),
                "fd00:91::/64".parse().unwrap(),
            ],
            false,
        );
        let ips = ["10.91.0.2".parse().unwrap(), "fd00:91::2".parse().unwrap()];
        z.set_endpoint("e1", &["web".into(), "www".into()], &ips);
        z.set_endpoint("e2", &["db".into(), "www".into()], &ips[..1]);
        z
    })
}

fuzz_target!(|data: &[u8]| {
    for tcp in [false, true] {
        if let Step::Reply(r) = respond(zone(), data, tcp, &Vec::new) {
            assert!(r.len() >= 12 && r[..2] == data[..2] && r[2] & 0x80 != 0);
            assert!(tcp || r.len() <= 1232);
        }
    }
});
