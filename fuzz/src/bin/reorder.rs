//! AFL++ target `reorder`: see [`crosslink_fuzz::reorder`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::reorder(data) {
            panic!("fuzz reorder: {why}");
        }
    });
}
