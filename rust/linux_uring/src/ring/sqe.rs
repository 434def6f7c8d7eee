//! The SQE of one claimed Operation.

use std::ptr;

use caio_core::op::{OpKind, Operation};
use caio_core::sys::MAX_TRANSFER;
use io_uring::{opcode, squeue, types};

/// Builds the SQE of a claimed op (user_data = the op's address), from its
/// I/O window as `direct` readied it.
///
/// # Safety
/// The calling engine owns `o`: claimed (or its CQE consumed for a retry)
/// and not in the kernel.
pub(super) unsafe fn sqe(o: &Operation) -> squeue::Entry {
    let fd = types::Fd(o.fd_i32());
    let entry = match o.kind {
        OpKind::Read | OpKind::Write => {
            // SAFETY: the engine owns `o` (contract above).
            let io = unsafe { o.io() };
            // DESIGN.md §6.2 uring-4g: never more than the kernel's single-transfer cap;
            // the partial count is reported and callers loop.
            let len = io.len.min(MAX_TRANSFER) as u32;
            if o.kind == OpKind::Read {
                opcode::Read::new(fd, io.ptr, len).offset(io.offset).build()
            } else {
                opcode::Write::new(fd, io.ptr, len)
                    .offset(io.offset)
                    .build()
            }
        }
        OpKind::ReadV | OpKind::WriteV => {
            // SAFETY: the engine owns `o` (contract above): its iovecs and
            // the buffers they describe stay valid until its completion.
            let (iov, count) = unsafe { o.iovecs() };
            // At most IOV_MAX (1024) entries: fits u32.
            let count = count as u32;
            if o.kind == OpKind::ReadV {
                opcode::Readv::new(fd, iov.cast::<libc::iovec>(), count)
                    .offset(o.offset)
                    .build()
            } else {
                opcode::Writev::new(fd, iov.cast::<libc::iovec>(), count)
                    .offset(o.offset)
                    .build()
            }
        }
        OpKind::Fsync => opcode::Fsync::new(fd).build(),
        OpKind::Fdsync => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    };
    entry.user_data(ptr::from_ref(o) as u64)
}
