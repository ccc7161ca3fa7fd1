//! AFL++ target `segment`: see [`crosslink_fuzz::segment`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::segment(data) {
            panic!("fuzz segment: {why}");
        }
    });
}
