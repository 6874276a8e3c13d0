//! Redis (filled in below).
