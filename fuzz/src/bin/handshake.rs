//! AFL++ target `handshake`: see [`crosslink_fuzz::handshake`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::handshake(data) {
            panic!("fuzz handshake: {why}");
        }
    });
}
