//! AFL++ target `flow`: see [`crosslink_fuzz::flow`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::flow(data) {
            panic!("fuzz flow: {why}");
        }
    });
}
