//! AFL++ target `overlay`: see [`crosslink_fuzz::overlay`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::overlay(data) {
            panic!("fuzz overlay: {why}");
        }
    });
}
