//! Opaque TCP relay between a downstream and an upstream socket: in userspace, or spliced in
//! the kernel (sockmap) once nothing more needs to be seen.
