//! Records the commit this is built from (see `common/build/revision.rs`).

include!("../common/build/revision.rs");

fn main() {
    emit_revision();
}
