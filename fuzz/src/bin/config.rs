//! AFL++ target `config`: see [`crosslink_fuzz::config`].
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Err(why) = crosslink_fuzz::config(data) {
            panic!("fuzz config: {why}");
        }
    });
}
