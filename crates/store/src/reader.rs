//! The expert reader: reads a batch of byte ranges from the model files into slot memory, concurrently, with
//! O_DIRECT where the filesystem allows it and buffered `pread` where it does not.
//!
//! `ExpertStore::ensure` (see `cache`) turns all ranges of all of one call's missed experts (gate, up, down, and MLX
//! scales and biases) into one batch of `ReadRequest`s and submits it as the *demand* batch; `wait` blocks until
//! every request of it has finished. A persistent pool of `io_threads` I/O threads claims requests one at a time, so
//! up to `io_threads` reads are in flight together (k misses × 3+ ranges per token and layer).
//!
//! **Two lanes.** Guesses (`ExpertStore::prefetch`) go into a separate *prefetch* lane. A thread always claims a
//! waiting demand request first and a prefetch request only while fewer than half the threads are reading guesses,
//! so a demand batch never queues behind a guess: it finds idle threads at once and shares the disk with at most
//! that many guessed reads. `cancel_prefetch` withdraws the guessed requests no thread has claimed yet (but those a
//! caller still wants), so a guess that turned out wrong costs at most the reads already on the disk. One demand
//! batch and one prefetch batch are in flight at most; a new guess while the last one is still on the disk is
//! refused (`submit_prefetch` returns false) rather than queued.
//!
//! **Direct I/O.** Each file is opened twice: buffered (the fallback) and with `O_DIRECT`, so the page cache does not
//! keep a second copy of every expert and the memory budget stays honest. O_DIRECT needs the offset, the length and
//! the buffer address aligned to the logical block size; we use `BLOCK` = 4096 for all three. A range whose offset,
//! length and destination are all aligned is read straight into the slot. Any other range is read as its aligned
//! superset into the I/O thread's bounce buffer, and the wanted bytes are copied into the slot (head and tail
//! trimmed). If opening with O_DIRECT fails, or a direct read of a file fails with EINVAL before any direct read of
//! that file succeeded (tmpfs on older kernels, some FUSE and network filesystems), that file falls back to buffered
//! `pread` for good, with one warning naming it.
//!
//! **Coalesced reads.** Where all of one expert's ranges lie back to back in one file (a `moestream pack` sidecar),
//! the store sends one request for the whole span with up to `MAX_SEGS` destination segments. Direct: the aligned
//! superset goes into the bounce buffer and each segment is copied out. Buffered: one `preadv` with an iovec per
//! segment. Not when every range of the expert could land in place (direct, whole blocks, no conversion: a sidecar
//! in layout `packed`): then each range is its own request straight into the slot, since the disk gives a miss's
//! three requests its full rate and the bounce copy would cost the compute cores a pass over every byte.
//!
//! **Conversion.** A segment may convert on the way (`Segment::convert`): pack file rows into the slot's 16-row
//! form, or unpack a packed sidecar's rows for row-major kernels. The one place bytes change form.
//!
//! **No allocation per batch.** Bounce buffers are allocated once per I/O thread (largest request + 2 blocks) when the
//! reader is built; the batch is a caller-owned slice that `run` publishes to the workers through a raw pointer
//! under a mutex; the workers and the submitter meet on a `Mutex` + two `Condvar`s (futex-based in std, no heap).
//! The caller (`ExpertStore`) keeps its request vector and reuses it, reserved up front. Only a failed read
//! allocates (the error carries the path).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use moestream_format::{Encoding, FileRange};

use crate::{AlignedBuf, StoreError};

/// Alignment of offset, length and buffer address for O_DIRECT reads. 4096 covers every logical block size in
/// common use (512 and 4096), and `AlignedBuf` gives slot memory at this alignment.
pub const BLOCK: u64 = 4096;

/// How the expert store reads experts from disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadOptions {
    /// Read with O_DIRECT where the filesystem allows it (per file, with a buffered fallback).
    pub direct_io: bool,
    /// I/O threads, which is also the queue depth: how many reads are in flight at once. 0 counts as 1.
    pub io_threads: usize,
    /// Testing aid: behave as if every file's filesystem refused O_DIRECT reads with EINVAL, to exercise the
    /// fallback on filesystems that accept O_DIRECT.
    #[doc(hidden)]
    pub simulate_direct_einval: bool,
    /// Testing aid: an I/O thread sleeps this long before each prefetch read, so a test can find a guess still in
    /// flight (or not yet started) whatever the machine's speed.
    #[doc(hidden)]
    pub simulate_prefetch_delay: std::time::Duration,
    /// Store the experts of these encodings (`Q4_0`, `Q4_K`, `Q6_K`, whose parts have a multiple of 16 rows) in their
    /// packed forms, packed by the I/O thread on the way from its staging buffer into the slot. The model sets the
    /// encodings its kernels have packed forms for (`Dispatch::pack_set`); the bytes a slot holds change, the values
    /// do not.
    pub pack: moestream_quant::packed::PackSet,
}

impl Default for ReadOptions {
    fn default() -> Self {
        ReadOptions {
            direct_io: true,
            io_threads: 8,
            simulate_direct_einval: false,
            simulate_prefetch_delay: std::time::Duration::ZERO,
            pack: moestream_quant::packed::PackSet::NONE,
        }
    }
}

/// Most destination segments one request scatters into: one expert's gate, up and down data plus MLX scales and
/// biases (3 × 3).
pub(crate) const MAX_SEGS: usize = 9;

/// A piece of slot memory that receives the next `len` bytes of a request's range.
#[derive(Clone, Copy)]
pub(crate) struct Segment {
    pub dst: *mut u8,
    pub len: usize,
    /// Some((from, to, cols)): the bytes are rows of `from` with `cols` columns, to be stored as `to`: packed
    /// (`moestream_quant::packed::pack`) or, from a sidecar stored packed, unpacked.
    pub convert: Option<(Encoding, Encoding, u32)>,
}

pub(crate) const NO_SEGMENT: Segment = Segment { dst: std::ptr::null_mut(), len: 0, convert: None };

impl Segment {
    /// Whether the bytes must pass through a staging buffer (to be packed or unpacked) rather than land in place.
    fn staged(&self) -> bool {
        self.convert.is_some()
    }

    /// Moves `src` (this segment's bytes as read) into the segment: a copy, or the conversion between the file's
    /// encoding and its 16-row form.
    ///
    /// # Safety
    /// `dst` is valid for `len` writable bytes that nobody else touches during the batch (see `ReadRequest`).
    unsafe fn fill_from(&self, src: &[u8]) -> io::Result<()> {
        // SAFETY: guaranteed by the caller.
        let dst = unsafe { std::slice::from_raw_parts_mut(self.dst, self.len) };
        let Some((from, to, cols)) = self.convert else {
            dst.copy_from_slice(src);
            return Ok(());
        };
        let cols = cols as usize;
        let rows = from.row_bytes(cols).map_or(0, |rb| self.len / rb.max(1));
        let r = if to.is_packed() {
            moestream_quant::packed::pack(from, src, dst, rows, cols)
        } else {
            moestream_quant::packed::unpack(from, src, dst, rows, cols)
        };
        r.map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidData, format!("{} → {}, {rows} rows: {e}", from.name(), to.name()))
        })
    }
}

/// One range to read into slot memory: into one destination, or (a coalesced read of an expert whose ranges are
/// adjacent in one file, as in a pack sidecar) scattered over up to `MAX_SEGS` destinations, in order, whose lengths
/// add up to `range.len`. The worker fills in the outcome fields.
pub(crate) struct ReadRequest {
    pub range: FileRange,
    segs: [Segment; MAX_SEGS],
    nsegs: usize,
    /// The caller's tag (which missed expert this range belongs to).
    pub tag: u32,
    /// Bytes the syscalls transferred: `range.len` when buffered, the aligned superset when direct.
    pub disk_bytes: u64,
    pub direct: bool,
    pub done_at: Instant,
    pub error: Option<StoreError>,
    /// A prefetch request withdrawn before any I/O thread claimed it (`ExpertReader::cancel_prefetch`): nothing was
    /// read, and its destination holds no expert.
    pub cancelled: bool,
}

// SAFETY: the segments point into slot memory that the submitting `ExpertStore` borrows exclusively (`&mut self`)
// for the whole of `ExpertReader::run`; the requests of one batch write pairwise disjoint bytes, and each request is
// handled by exactly one worker.
unsafe impl Send for ReadRequest {}

impl ReadRequest {
    /// Read `range` into the `range.len` writable bytes at `dst`.
    pub fn new(range: FileRange, dst: *mut u8, tag: u32, now: Instant) -> Self {
        let mut segs = [NO_SEGMENT; MAX_SEGS];
        segs[0] = Segment { dst, len: range.len as usize, convert: None };
        ReadRequest {
            range,
            segs,
            nsegs: 1,
            tag,
            disk_bytes: 0,
            direct: false,
            done_at: now,
            error: None,
            cancelled: false,
        }
    }

    /// One read of `range`, scattered over `segs` in order. The caller guarantees that `segs` is not empty, has at
    /// most `MAX_SEGS` entries, and that their lengths add up to `range.len`.
    pub fn scatter(range: FileRange, segs: &[Segment], tag: u32, now: Instant) -> Self {
        debug_assert!(!segs.is_empty() && segs.len() <= MAX_SEGS);
        debug_assert_eq!(segs.iter().map(|s| s.len as u64).sum::<u64>(), range.len);
        let mut r = ReadRequest::new(range, segs[0].dst, tag, now);
        r.segs[..segs.len()].copy_from_slice(segs);
        r.nsegs = segs.len();
        r
    }

    /// The destination segments, in file order.
    pub fn segments(&self) -> &[Segment] {
        &self.segs[..self.nsegs]
    }

    /// Marks a single-destination request as rows of `from` with `cols` columns, to be stored as `to` (one is the
    /// other's packed form).
    pub fn converted(mut self, from: Encoding, to: Encoding, cols: usize) -> Self {
        self.segs[0].convert = Some((from, to, cols as u32));
        self
    }

    /// Whether an O_DIRECT read can put this request's bytes straight into place: one destination, no conversion,
    /// and offset, length and destination all on `BLOCK` boundaries.
    pub fn lands_in_place(&self) -> bool {
        in_place(self.range, self.segments())
    }
}

/// Per-file direct I/O state.
const DIRECT_UNPROVEN: u8 = 0;
const DIRECT_PROVEN: u8 = 1;
const BUFFERED: u8 = 2;

struct ReaderFiles {
    paths: Vec<PathBuf>,
    buffered: Vec<File>,
    direct: Vec<Option<File>>,
    mode: Vec<AtomicU8>,
    simulate_einval: bool,
}

impl ReaderFiles {
    fn open(paths: &[PathBuf], opts: &ReadOptions) -> Result<Self, StoreError> {
        let n = paths.len();
        let (mut buffered, mut direct, mut mode) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for p in paths {
            buffered.push(File::open(p).map_err(|source| StoreError::Open { path: p.clone(), source })?);
            if !opts.direct_io {
                direct.push(None);
                mode.push(AtomicU8::new(BUFFERED));
                continue;
            }
            match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(p) {
                Ok(f) => {
                    direct.push(Some(f));
                    mode.push(AtomicU8::new(DIRECT_UNPROVEN));
                }
                Err(e) => {
                    eprintln!(
                        "warning: {}: cannot open with O_DIRECT ({e}); reading experts with buffered pread",
                        p.display()
                    );
                    direct.push(None);
                    mode.push(AtomicU8::new(BUFFERED));
                }
            }
        }
        Ok(ReaderFiles { paths: paths.to_vec(), buffered, direct, mode, simulate_einval: opts.simulate_direct_einval })
    }

    /// Read one request, recording its outcome in it. `bounce` is this thread's aligned scratch buffer.
    fn execute(&self, req: &mut ReadRequest, bounce: &mut [u8]) {
        let f = req.range.file as usize;
        let segs = req.segments();
        let mut r = Err(io::Error::from_raw_os_error(libc::EINVAL));
        let mut tried_direct = false;
        if self.mode[f].load(Ordering::Acquire) != BUFFERED
            && let Some(df) = &self.direct[f]
        {
            tried_direct = true;
            r = self.read_direct(df, req.range, segs, bounce).map(|n| (n, true));
            match &r {
                Ok(_) => {
                    let _ = self.mode[f].compare_exchange(
                        DIRECT_UNPROVEN,
                        DIRECT_PROVEN,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    if self.refuse_direct(f, e) {
                        tried_direct = false;
                    }
                }
                Err(_) => {}
            }
        }
        if !tried_direct {
            r = if segs.iter().any(Segment::staged) {
                read_staged(&self.buffered[f], req.range, segs, bounce).map(|_| (req.range.len, false))
            } else {
                preadv_exact(&self.buffered[f], segs, req.range.offset).map(|_| (req.range.len, false))
            };
        }
        match r {
            Ok((n, direct)) => {
                req.disk_bytes = n;
                req.direct = direct;
            }
            Err(source) => {
                req.error = Some(StoreError::Read {
                    path: self.paths[f].clone(),
                    offset: req.range.offset,
                    len: req.range.len,
                    source,
                })
            }
        }
        req.done_at = Instant::now();
    }

    /// A direct read of file `f` failed with EINVAL. Before any direct read of it succeeded, that means the
    /// filesystem refuses O_DIRECT: switch the file to buffered reads (warning once) and return true. After one
    /// succeeded it is a real error: return false.
    fn refuse_direct(&self, f: usize, e: &io::Error) -> bool {
        let mut cur = self.mode[f].load(Ordering::Acquire);
        loop {
            match cur {
                DIRECT_PROVEN => return false,
                BUFFERED => return true,
                _ => match self.mode[f].compare_exchange(cur, BUFFERED, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => {
                        eprintln!(
                            "warning: {}: O_DIRECT read refused ({e}); reading experts with buffered pread",
                            self.paths[f].display()
                        );
                        return true;
                    }
                    Err(now) => cur = now,
                },
            }
        }
    }

    /// Read `range` into `segs` through the O_DIRECT handle. Returns the bytes transferred from disk.
    fn read_direct(&self, df: &File, range: FileRange, segs: &[Segment], bounce: &mut [u8]) -> io::Result<u64> {
        if self.simulate_einval {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if let [seg] = segs
            && in_place(range, segs)
        {
            // SAFETY: see `ReadRequest`: the segment is valid for `len` bytes and nobody else touches them during
            // the batch.
            let dst = unsafe { std::slice::from_raw_parts_mut(seg.dst, seg.len) };
            let got = pread_direct(df, dst, range.offset, range.len as usize)?;
            return if got < range.len as usize { Err(short_read(range, got)) } else { Ok(got as u64) };
        }
        // The aligned superset [start, end) of the range, through the bounce buffer, then scattered.
        let start = range.offset / BLOCK * BLOCK;
        let end = (range.offset + range.len).div_ceil(BLOCK) * BLOCK;
        let head = (range.offset - start) as usize;
        let need = head + range.len as usize;
        let buf = &mut bounce[..(end - start) as usize];
        let got = pread_direct(df, buf, start, need)?;
        if got < need {
            return Err(short_read(range, got.saturating_sub(head)));
        }
        scatter(segs, &buf[head..need])?;
        Ok(got as u64)
    }
}

/// Whether a direct read of `range` can go straight into `segs`: one destination, no conversion, and offset, length
/// and destination all on `BLOCK` boundaries. The store plans by it (`ReadRequest::lands_in_place`) and the reader
/// reads by it, so the two cannot disagree.
fn in_place(range: FileRange, segs: &[Segment]) -> bool {
    let aligned = |x: u64| x.is_multiple_of(BLOCK);
    let [seg] = segs else { return false };
    !seg.staged() && aligned(range.offset) && aligned(range.len) && aligned(seg.dst as u64)
}

/// Moves a request's bytes from a staging buffer into its segments, in order.
fn scatter(segs: &[Segment], mut src: &[u8]) -> io::Result<()> {
    for seg in segs {
        let (now, rest) = src.split_at(seg.len);
        // SAFETY: see `ReadRequest`: each segment is valid for `len` bytes that nobody else touches during the batch.
        unsafe { seg.fill_from(now)? };
        src = rest;
    }
    Ok(())
}

/// Buffered read of `range` into the staging buffer `bounce`, then into `segs` (for segments that are packed on
/// the way).
fn read_staged(f: &File, range: FileRange, segs: &[Segment], bounce: &mut [u8]) -> io::Result<()> {
    let buf = &mut bounce[..range.len as usize];
    f.read_exact_at(buf, range.offset)?;
    scatter(segs, buf)
}

/// Buffered positioned read of `offset..` into `segs` in order (one `preadv`, with one iovec per segment, repeated
/// only after a short transfer), until every segment is full.
fn preadv_exact(f: &File, segs: &[Segment], mut offset: u64) -> io::Result<()> {
    let mut iov = [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_SEGS];
    for (v, s) in iov.iter_mut().zip(segs) {
        *v = libc::iovec { iov_base: s.dst.cast(), iov_len: s.len };
    }
    let n = segs.len();
    let mut first = 0;
    while first < n && iov[first].iov_len == 0 {
        first += 1;
    }
    while first < n {
        let v = &iov[first..n];
        // SAFETY: every iovec points at writable slot memory of its length (see `ReadRequest`).
        let r = unsafe { libc::preadv(f.as_raw_fd(), v.as_ptr(), v.len() as libc::c_int, offset as libc::off_t) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "failed to fill whole buffer"));
        }
        let mut r = r as usize;
        offset += r as u64;
        while first < n && r >= iov[first].iov_len {
            r -= iov[first].iov_len;
            first += 1;
        }
        if r > 0 {
            // SAFETY: r < iov_len, so the new base stays inside the segment.
            iov[first].iov_base = unsafe { iov[first].iov_base.cast::<u8>().add(r) }.cast();
            iov[first].iov_len -= r;
        }
    }
    Ok(())
}

/// Positioned O_DIRECT reads into `buf` (aligned address, aligned length) from aligned `offset` until at least `need`
/// bytes have arrived or the file ends. Returns the bytes read, which may exceed `need` (the aligned tail).
fn pread_direct(f: &File, buf: &mut [u8], offset: u64, need: usize) -> io::Result<usize> {
    let mut got = 0;
    while got < need {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                // A transfer that ends off a block boundary ended at end of file; reading on would be unaligned.
                if !(got as u64).is_multiple_of(BLOCK) {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn short_read(range: FileRange, got: usize) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("short read: the file ends after {got} of {} bytes (truncated?)", range.len),
    )
}

/// One caller-owned slice of requests, published to the workers for the time it is in flight.
struct Lane {
    reqs: *mut ReadRequest,
    len: usize,
    /// Requests `[0, next)` have been claimed by a worker; `[next, len)` wait.
    next: usize,
    /// Requests neither finished nor cancelled.
    remaining: usize,
}

const IDLE: Lane = Lane { reqs: std::ptr::null_mut(), len: 0, next: 0, remaining: 0 };

impl Lane {
    fn unclaimed(&self) -> bool {
        self.next < self.len
    }

    /// Claim the next request.
    ///
    /// # Safety
    /// The lane holds a published slice (`unclaimed()` was true under the mutex).
    unsafe fn claim(&mut self) -> *mut ReadRequest {
        let i = self.next;
        self.next += 1;
        // SAFETY: i < len, and the submitter keeps the slice alive until `remaining` reaches 0, which needs this
        // request to finish; index i is claimed by one worker alone.
        unsafe { self.reqs.add(i) }
    }
}

/// What the workers work on: a demand lane (the reads an `ensure` waits for) and a prefetch lane (guesses). A
/// worker always takes a waiting demand request first, and takes prefetch requests only while fewer than
/// `prefetch_cap` are in flight, so a demand read never queues behind guesses: at most `prefetch_cap` guesses
/// are on the disk when it arrives, and the other threads are free for it.
struct Batch {
    demand: Lane,
    prefetch: Lane,
    /// Prefetch requests being read now.
    prefetch_active: usize,
    prefetch_cap: usize,
    /// Workers that have started (`open` waits for all, so thread start-up never lands on the token path).
    started: usize,
    shutdown: bool,
}

// SAFETY: the lanes' `reqs` are only dereferenced by a worker for an index it claimed under the mutex, or by
// `cancel_prefetch` for unclaimed ones under the mutex, while the submitter (which owns the slice) keeps it alive
// until the lane's `remaining` reaches 0; see `ReadRequest`.
unsafe impl Send for Batch {}

struct Shared {
    batch: Mutex<Batch>,
    prefetch_delay: std::time::Duration,
    work: Condvar,
    done: Condvar,
    files: ReaderFiles,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Batch> {
        self.batch.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A persistent pool of I/O threads over the model's files.
pub(crate) struct ExpertReader {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ExpertReader {
    /// Open `paths` (a `TensorIndex`'s files) and start `opts.io_threads` I/O threads, each with a bounce buffer for
    /// requests (single or coalesced) of up to `max_range` bytes. `converts`: some requests will be packed or
    /// unpacked on the way, so buffered reads need the bounce buffer too.
    pub fn open(paths: &[PathBuf], opts: &ReadOptions, max_range: u64, converts: bool) -> Result<Self, StoreError> {
        let files = ReaderFiles::open(paths, opts)?;
        let shared = Arc::new(Shared {
            batch: Mutex::new(Batch {
                demand: IDLE,
                prefetch: IDLE,
                prefetch_active: 0,
                // Half the threads at most for guesses: a demand read always finds idle threads at once.
                prefetch_cap: (opts.io_threads.max(1) / 2).max(1),
                started: 0,
                shutdown: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            prefetch_delay: opts.simulate_prefetch_delay,
            files,
        });
        let threads = opts.io_threads.max(1);
        // The aligned superset of a request spans at most its length plus one block on each side. Buffered reads
        // (`preadv`) need no bounce buffer, unless they are converted on the way.
        let staged = opts.direct_io || converts;
        let bounce_len = if staged { (max_range.div_ceil(BLOCK) + 2) * BLOCK } else { 0 } as usize;
        let mut reader = ExpertReader { shared, workers: Vec::with_capacity(threads) };
        for i in 0..threads {
            let bounce = AlignedBuf::zeroed(bounce_len)?;
            let shared = Arc::clone(&reader.shared);
            let h = std::thread::Builder::new()
                .name(format!("moestream-io-{i}"))
                .spawn(move || worker(&shared, bounce))
                .map_err(|source| StoreError::Open { path: "I/O thread".into(), source })?;
            reader.workers.push(h);
        }
        let mut b = reader.shared.lock();
        while b.started < threads {
            b = reader.shared.done.wait(b).unwrap_or_else(PoisonError::into_inner);
        }
        drop(b);
        Ok(reader)
    }

    /// Per file (indexed like `TensorIndex::files`): whether reads use O_DIRECT (as far as known: a file whose
    /// first direct read has not happened yet counts as direct).
    pub fn direct_active(&self) -> impl Iterator<Item = bool> + '_ {
        self.shared.files.mode.iter().map(|m| m.load(Ordering::Acquire) != BUFFERED)
    }

    /// Execute every request of `reqs` on the I/O threads and return when all have finished (successfully or
    /// not: check each request's `error`). Allocates nothing. The store itself submits and waits separately.
    #[cfg(test)]
    pub fn run(&mut self, reqs: &mut [ReadRequest]) {
        // SAFETY: `reqs` is borrowed mutably until `wait` below returns, which is before this call ends.
        unsafe { self.submit(reqs) };
        self.wait();
    }

    /// Start executing `reqs` as demand reads and return at once (`ensure_begin`): they go ahead of any waiting
    /// prefetch request. A demand batch still in flight is waited for first: one runs at a time.
    ///
    /// # Safety
    /// Until `wait` (or the next `submit`/`run`) returns, the caller must keep `reqs` alive and not touch it, and must
    /// not read or write the destination bytes of its requests, nor free them.
    pub unsafe fn submit(&mut self, reqs: &mut [ReadRequest]) {
        self.wait();
        if reqs.is_empty() {
            return;
        }
        let mut b = self.shared.lock();
        b.demand = Lane { reqs: reqs.as_mut_ptr(), len: reqs.len(), next: 0, remaining: reqs.len() };
        drop(b);
        // One wake per request, not all threads: a miss is ~3 requests, and every thread woken for nothing takes a
        // context switch on the cores the matmuls run on.
        for _ in 0..reqs.len().min(self.workers.len()) {
            self.shared.work.notify_one();
        }
    }

    /// Wait until the demand batch in flight (if any) has finished.
    pub fn wait(&mut self) {
        self.wait_lane(|b| &mut b.demand);
    }

    /// Wait until `lane`'s requests have all finished (or were cancelled), then mark it idle. Both lanes' waiters
    /// share `done`.
    fn wait_lane(&self, lane: fn(&mut Batch) -> &mut Lane) {
        let mut b = self.shared.lock();
        while lane(&mut b).remaining > 0 {
            b = self.shared.done.wait(b).unwrap_or_else(PoisonError::into_inner);
        }
        *lane(&mut b) = IDLE;
    }

    /// Start reading `reqs` as guesses and return true at once; return false, starting nothing, while the previous
    /// prefetch batch still has requests in flight (a guess is dropped rather than queued behind another).
    ///
    /// # Safety
    /// As `submit`, until `wait_prefetch` returns or `prefetch_idle` returns true.
    pub unsafe fn submit_prefetch(&mut self, reqs: &mut [ReadRequest]) -> bool {
        let mut b = self.shared.lock();
        if b.prefetch.remaining > 0 {
            return false;
        }
        if reqs.is_empty() {
            b.prefetch = IDLE;
            return true;
        }
        b.prefetch = Lane { reqs: reqs.as_mut_ptr(), len: reqs.len(), next: 0, remaining: reqs.len() };
        let wake = reqs.len().min(b.prefetch_cap);
        drop(b);
        for _ in 0..wake {
            self.shared.work.notify_one();
        }
        true
    }

    /// Withdraw the prefetch requests no thread has claimed yet, except those whose tag `keep` accepts (they stay
    /// queued, in the order they were): each withdrawn one is marked `cancelled` and nothing is read for it.
    /// Requests being read go on. `keep` is asked once per unclaimed request, so it may also note the tags it
    /// withdraws. Returns whether the prefetch lane is now idle. Allocates nothing.
    pub fn cancel_prefetch(&mut self, keep: &mut dyn FnMut(u32) -> bool) -> bool {
        let mut b = self.shared.lock();
        let lane = &mut b.prefetch;
        let mut kept = lane.next;
        for i in lane.next..lane.len {
            // SAFETY: unclaimed, so no worker touches these, and the submitter keeps the slice alive (see `Batch`).
            unsafe {
                let r = lane.reqs.add(i);
                if keep((*r).tag) {
                    std::ptr::swap(r, lane.reqs.add(kept));
                    kept += 1;
                } else {
                    (*r).cancelled = true;
                }
            }
        }
        lane.remaining -= lane.len - kept;
        lane.len = kept;
        lane.remaining == 0
    }

    /// Whether no prefetch request is in flight (the prefetch slice may be reused).
    pub fn prefetch_idle(&self) -> bool {
        self.shared.lock().prefetch.remaining == 0
    }

    /// Wait until every prefetch request has finished (or was cancelled).
    pub fn wait_prefetch(&mut self) {
        self.wait_lane(|b| &mut b.prefetch);
    }
}

impl Drop for ExpertReader {
    fn drop(&mut self) {
        // A batch in flight writes into memory its submitter owns: let it land before the threads go.
        self.wait();
        self.cancel_prefetch(&mut |_| false);
        self.wait_prefetch();
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn worker(shared: &Shared, mut bounce: AlignedBuf) {
    shared.lock().started += 1;
    shared.done.notify_all();
    loop {
        let (req, guess) = {
            let mut b = shared.lock();
            loop {
                if b.shutdown {
                    return;
                }
                if b.demand.unclaimed() {
                    // SAFETY: unclaimed, under the mutex.
                    break (unsafe { &mut *b.demand.claim() }, false);
                }
                if b.prefetch.unclaimed() && b.prefetch_active < b.prefetch_cap {
                    b.prefetch_active += 1;
                    // SAFETY: unclaimed, under the mutex.
                    break (unsafe { &mut *b.prefetch.claim() }, true);
                }
                b = shared.work.wait(b).unwrap_or_else(PoisonError::into_inner);
            }
        };
        if guess && !shared.prefetch_delay.is_zero() {
            std::thread::sleep(shared.prefetch_delay);
        }
        shared.files.execute(req, bounce.as_mut_slice());
        let mut b = shared.lock();
        let lane = if guess { &mut b.prefetch } else { &mut b.demand };
        lane.remaining -= 1;
        // Both lanes' waiters share `done`, so every waiter is woken and checks its own lane.
        let finished = lane.remaining == 0;
        if guess {
            b.prefetch_active -= 1;
            if b.prefetch.unclaimed() {
                // A prefetch place freed: another guess may start (demand requests never wait for this).
                shared.work.notify_one();
            }
        }
        if finished {
            shared.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every alignment case against a file whose length is not a multiple of the block: aligned straight into the
    /// destination, unaligned head, unaligned tail, a range ending at end of file, and one past it.
    #[test]
    fn direct_reads_trim_head_and_tail() {
        // In the source tree: a disk filesystem, where O_DIRECT is allowed (unlike tmpfs on older kernels).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("blob");
        let len = 5 * BLOCK as usize + 123;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4096) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let cases: [(u64, u64); 6] =
            [(4096, 8192), (100, 5000), (4096, 5000), (0, len as u64), (5 * 4096, 123), (10, 4096)];
        for (direct, threads) in [(true, 1), (true, 8), (false, 3)] {
            let opts = ReadOptions { direct_io: direct, io_threads: threads, ..ReadOptions::default() };
            let mut reader = ExpertReader::open(std::slice::from_ref(&path), &opts, len as u64, false).unwrap();
            let total: usize = cases.iter().map(|c| c.1.next_multiple_of(BLOCK) as usize).sum();
            // One more block for the read past end of file, which may leave partial bytes behind.
            let mut dst = AlignedBuf::zeroed(total + BLOCK as usize).unwrap();
            let base = dst.as_mut_ptr();
            let now = Instant::now();
            let mut at = 0usize;
            let mut reqs: Vec<ReadRequest> = cases
                .iter()
                .map(|&(offset, n)| {
                    // SAFETY: `dst` holds every case at a block-aligned position.
                    let r = ReadRequest::new(FileRange { file: 0, offset, len: n }, unsafe { base.add(at) }, 0, now);
                    at += n.next_multiple_of(BLOCK) as usize;
                    r
                })
                .collect();
            // SAFETY: the last block of `dst`.
            let past = unsafe { base.add(total) };
            reqs.push(ReadRequest::new(FileRange { file: 0, offset: len as u64 - 10, len: 20 }, past, 1, now));
            reader.run(&mut reqs);
            // A filesystem that refuses O_DIRECT falls back; the bytes must be right either way.
            let direct = direct && reader.direct_active().all(|d| d);
            let mut at = 0usize;
            for (r, &(offset, n)) in reqs.iter().zip(&cases) {
                assert!(r.error.is_none(), "{offset}+{n}: {:?}", r.error);
                assert_eq!(r.direct, direct);
                let (o, n) = (offset as usize, n as usize);
                assert!(dst.as_slice()[at..at + n] == bytes[o..o + n], "direct={direct} {o}+{n}");
                at += n.next_multiple_of(BLOCK as usize);
            }
            // Aligned offset, length and destination: read in place, no superset.
            assert_eq!(reqs[0].disk_bytes, 8192);
            assert_eq!(reqs[1].disk_bytes, if direct { 8192 } else { 5000 });
            let past = reqs.last().unwrap();
            let e = past.error.as_ref().expect("a read past end of file fails").to_string();
            assert!(e.contains("blob") && e.contains(&format!("offset {}", len - 10)), "{e}");
        }
    }
}
