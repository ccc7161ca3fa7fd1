//! AFL++ target `sealed`: see [`crosslink_fuzz::sealed`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::sealed(data) {
            panic!("fuzz sealed: {why}");
        }
    });
}
