//! AFL++ target `coalesce`: see [`crosslink_fuzz::coalesce`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::coalesce(data) {
            panic!("fuzz coalesce: {why}");
        }
    });
}
