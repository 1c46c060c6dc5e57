fn main() {
    mulo_build_support::link_libtorch();
}
