//! AFL++ target `bfd`: see [`crosslink_fuzz::bfd`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::bfd(data) {
            panic!("fuzz bfd: {why}");
        }
    });
}
