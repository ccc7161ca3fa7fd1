//! AFL++ target `engine`: see [`crosslink_fuzz::engine`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::engine(data) {
            panic!("fuzz engine: {why}");
        }
    });
}
