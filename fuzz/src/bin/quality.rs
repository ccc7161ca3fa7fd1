//! AFL++ target `quality`: see [`crosslink_fuzz::quality`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::quality(data) {
            panic!("fuzz quality: {why}");
        }
    });
}
