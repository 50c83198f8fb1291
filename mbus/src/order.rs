//! The order a bus dials its endpoints in. Upstream (nats.go) shuffles its server pool per
//! client, so a fleet spreads over a cluster's nodes and the agents of a node that goes away
//! spread over the others. Dialling every agent's endpoints in URL order instead puts the whole
//! fleet on the first node, and moves all of it onto the second when the first goes: one
//! node carries every connection and takes the whole herd at once.
//!
//! Here the order is a permutation keyed by the agent id: distinct ids (UUIDs on a real
//! deployment) give independent orders, while one agent's order is the same at every attempt
//! and every restart (reproducible in its logs and in tests). With more candidates than one
//! attempt dials, the URL order is kept, so the first attempt reaches the first URLs as listed.

use std::net::SocketAddr;

/// Indices into `endpoints` (the resolved candidates, in URL order) in the order the bus of
/// `agent_id` dials them, `max_dials` being [`crate::BusOptions::max_dials_per_attempt`]:
/// sorted by a hash of (`agent_id`, address) when there are at most `max_dials` endpoints
/// (each attempt tries all of them, so the order decides only which comes first), else
/// `0..len` (URL order). Always a permutation of `0..endpoints.len()`, and the same
/// addresses in any input order give the same address sequence.
pub fn dial_order(agent_id: &str, endpoints: &[SocketAddr], max_dials: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..endpoints.len()).collect();
    if endpoints.len() > max_dials.max(1) {
        return order;
    }
    let key = |i: &usize| {
        let addr = endpoints[*i];
        (mix(agent_id, &addr.to_string()), addr, *i)
    };
    order.sort_by_cached_key(key);
    order
}

/// FNV-1a over `agent_id`, a separator and `addr`, then the splitmix64 finalizer, so that ids
/// differing in one character give unrelated orders. Stable across builds and platforms.
fn mix(agent_id: &str, addr: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in agent_id.bytes().chain([0xff]).chain(addr.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    fn cands(addrs: &[&str]) -> Vec<SocketAddr> {
        addrs.iter().map(|a| a.parse().expect("addr")).collect()
    }

    const NODES: [&str; 3] = ["10.77.0.11:4222", "10.77.0.12:4222", "10.77.0.13:4222"];

    fn addrs_in_order(c: &[SocketAddr], id: &str) -> Vec<SocketAddr> {
        dial_order(id, c, 8).into_iter().map(|i| c[i]).collect()
    }

    #[test]
    fn the_order_is_a_permutation_stable_per_agent_and_independent_of_input_order() {
        let c = cands(&NODES);
        let mut reversed = c.clone();
        reversed.reverse();
        for n in 0..50 {
            let id = format!("agent-{n}");
            let mut o = dial_order(&id, &c, 8);
            assert_eq!(
                addrs_in_order(&c, &id),
                addrs_in_order(&reversed, &id),
                "{id}"
            );
            assert_eq!(dial_order(&id, &c, 8), o, "{id}: same order every time");
            o.sort_unstable();
            assert_eq!(o, vec![0, 1, 2]);
        }
        assert!(dial_order("x", &[], 8).is_empty());
        assert_eq!(dial_order("x", &cands(&NODES[..1]), 8), vec![0]);
    }

    #[test]
    fn more_candidates_than_one_attempt_dials_keep_the_url_order() {
        let many: Vec<String> = (0..20).map(|i| format!("10.99.0.{i}:4222")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let c = cands(&refs);
        assert_eq!(dial_order("any", &c, 8), (0..20).collect::<Vec<_>>());
        // max_dials 0 counts as 1.
        assert_eq!(dial_order("any", &c[..2], 0), vec![0, 1]);
    }

    #[test]
    fn a_fleet_spreads_over_the_nodes_and_each_nodes_agents_over_the_others() {
        let c = cands(&NODES);
        // first node -> second node -> agents
        let mut seen: BTreeMap<SocketAddr, BTreeMap<SocketAddr, usize>> = BTreeMap::new();
        let n = 300;
        for i in 0..n {
            let o = addrs_in_order(&c, &format!("fleet-{i:03}"));
            *seen.entry(o[0]).or_default().entry(o[1]).or_default() += 1;
        }
        assert_eq!(seen.len(), 3, "every node is someone's first: {seen:?}");
        for (first, seconds) in &seen {
            let total: usize = seconds.values().sum();
            // A fair split gives 100 each; far from it means the ids do not spread.
            assert!(
                (60..=140).contains(&total),
                "{first}: {total} of {n} agents"
            );
            assert_eq!(
                seconds.len(),
                2,
                "{first}'s agents fail over to both others: {seconds:?}"
            );
            for (second, k) in seconds {
                assert!(
                    *k * 4 >= total,
                    "{first} -> {second}: {k} of {total}, the herd goes mostly one way"
                );
            }
        }
    }
}
