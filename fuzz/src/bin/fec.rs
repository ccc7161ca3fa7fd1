//! AFL++ target `fec`: see [`crosslink_fuzz::fec`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::fec(data) {
            panic!("fuzz fec: {why}");
        }
    });
}
