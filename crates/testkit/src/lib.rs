//! Test fakes and fixtures. Everything here is a stand-in, named as one.
