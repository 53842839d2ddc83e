//! The agent sends some datapath and proxy values as they are; comb-api declares their
//! shape for clients. These tests keep the two in step.

use comb_api::SpliceStats;

#[test]
fn splice_stats_have_the_wire_shape() {
    let dp = comb_datapath::SpliceStats {
        sockets: 1,
        redirected_msgs: 2,
        redirected_bytes: 3,
        passed_msgs: 4,
        passed_bytes: 5,
        sockets_added: 6,
        add_failures: 7,
        sticky_failures: 8,
        sockets_closed: 9,
        queue_fallbacks: 10,
        stall_fallbacks: 12,
        max_unread: 11,
    };
    let sent = serde_json::to_value(dp).unwrap();
    let read: SpliceStats = serde_json::from_value(sent.clone()).unwrap();
    // Every field the agent sends is read back, none is lost or renamed.
    assert_eq!(serde_json::to_value(read).unwrap(), sent);
}
