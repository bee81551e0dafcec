package nbd

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rs/zerolog"
)

// TransmissionOptions tunes the transmission engine. The zero value is ready
// to use.
type TransmissionOptions struct {
	// Handlers bounds how many device reads run at once on one connection.
	// 0 means 4 × GOMAXPROCS (at least 8). Raise it when the device may
	// block on slow fetches, so that one cold read does not hold up others.
	Handlers int
	// MaxRequestSize is the longest READ served, in bytes; longer ones get
	// EINVAL and the connection carries on. 0 means MaxRequestSize (32 MiB),
	// which is also the upper bound.
	MaxRequestSize uint32
	// DrainTimeout bounds how long requests already read may take to be
	// answered once ctx is cancelled or the peer sent NBD_CMD_DISC. Device
	// reads still running then are cancelled (ContextReaderAt) or left
	// behind, their replies dropped, and the connection is closed. 0 means
	// 10 s.
	DrainTimeout time.Duration
	// WriteTimeout ends the connection when the peer takes no reply bytes
	// for this long, so that a peer that stops reading cannot hold buffers
	// (and, under a Server, the shared budget) forever. 0 means no limit,
	// right for the kernel, which always takes its replies; Server uses 60 s
	// unless set (negative: no limit).
	WriteTimeout time.Duration
	// MaxBufferedBytes bounds the data buffers one connection holds at once
	// (reads being served plus replies not yet taken by the peer), so a
	// peer that asks for large reads and does not take the replies costs a
	// bounded amount of memory. 0 means 64 MiB; it is raised to at least
	// one largest request.
	MaxBufferedBytes int64
	// Logger receives device errors and connection diagnostics; nil is silent.
	Logger *zerolog.Logger

	// buffers is shared by all connections of a Server; nil gives the
	// connection a pool of its own.
	buffers *bufferPool
	// shared, if set, is a budget every connection of a Server draws from
	// in addition to its own.
	shared *byteBudget
	// abort, once closed, tears the connection down without a drain: the
	// kernel attachment's Detach uses it when its own wait has run out.
	abort <-chan struct{}
}

const (
	// readBufferSize is the request-side buffer: large enough to take in a
	// burst of pipelined headers (the kernel keeps up to 128 in flight per
	// socket) with one read system call.
	readBufferSize = 64 << 10
	defaultDrain   = 10 * time.Second
	// cancelGrace is how long cancelled device reads get to return before
	// the engine stops waiting for them.
	cancelGrace = 200 * time.Millisecond
	// peerCheckInterval is how often the engine checks whether the peer has
	// hung up, which the reader cannot see while it waits on the device, a
	// free slot or the buffer budget rather than on the socket.
	peerCheckInterval = time.Second
	// defaultBufferedBytes is a connection's default MaxBufferedBytes.
	defaultBufferedBytes = 64 << 20
	// A read of at most inlineMaxLength bytes is served by the reader itself
	// while device reads average under inlineThreshold: that is a page
	// cache or memory hit, not a wait. Each connection starts out assuming
	// a slow device (8 × the threshold), so reads go to the handlers until
	// about sixteen fast ones have been seen.
	inlineMaxLength = 1 << 20
	maxHeldReplies  = 32
	maxHeldBytes    = 1 << 20
	inlineThreshold = 250 * time.Microsecond
	// socketWriteBuffer is the send buffer asked for on the connection.
	socketWriteBuffer = 4 << 20
)

// ServeTransmission runs the transmission phase on conn, which must already
// be past any handshake: the kernel's NBD socket, or a network client after
// negotiation. It serves READ from dev, answers WRITE, TRIM and
// WRITE_ZEROES with EPERM (consuming a WRITE's payload so the stream stays
// in step), FLUSH with success and anything else with EINVAL. Replies go out
// in completion order.
//
// It returns nil after NBD_CMD_DISC or after ctx is cancelled, in both cases
// once every request already read has been answered, or DrainTimeout has
// passed: device reads still running then are cancelled through the
// connection's context (see ContextReaderAt) or, on a device that cannot be
// cancelled, left behind, and their replies are dropped; so it returns
// within DrainTimeout plus a fraction of a second whatever the device does.
// When the peer has hung up entirely (the kernel after a disconnect), no
// reply can be delivered and reads still running are cancelled at once. On
// cancellation, requests still in the socket are left unread
// and unanswered rather than failed with ESHUTDOWN: the kernel re-sends them
// on the socket a restarted server attaches, and a network client sees the
// connection close. It returns an error wrapping io.EOF when the peer closed
// without NBD_CMD_DISC, and another error when the stream broke (bad magic,
// short header, failed write). conn is always closed when it returns.
func ServeTransmission(ctx context.Context, conn net.Conn, dev Device, opts TransmissionOptions) error {
	if dev == nil {
		_ = conn.Close()
		return errNoDevice
	}
	return serveTransmission(ctx, conn, bufio.NewReaderSize(conn, readBufferSize), dev, opts)
}

// request is one slot of the engine: a request in flight from the moment the
// reader takes it until the writer has sent its reply.
type request struct {
	reply  [replyHeaderSize]byte // simple reply: magic, error, cookie
	offset int64
	length int
	buf    *[]byte // pooled data buffer; set only when the data is in hand
}

func (r *request) prepare(cookie uint64, errno uint32) {
	binary.BigEndian.PutUint32(r.reply[0:4], magicSimpleReply)
	binary.BigEndian.PutUint32(r.reply[4:8], errno)
	binary.BigEndian.PutUint64(r.reply[8:16], cookie)
}

func (r *request) setError(errno uint32) { binary.BigEndian.PutUint32(r.reply[4:8], errno) }

type engine struct {
	conn       net.Conn
	in         *bufio.Reader
	dev        Device
	size       uint64
	maxRequest uint32
	buffers    *bufferPool
	budget     *byteBudget // this connection's buffered bytes
	shared     *byteBudget // the server's, or nil
	log        zerolog.Logger

	free chan *request // idle slots; bounds requests in flight
	work chan *request // READs waiting for a handler

	// Replies to requests the reader answered itself, held back (up to
	// maxHeldReplies or maxHeldBytes) so that a burst of requests is
	// answered with one writev; released to the writer before the reader
	// could block: on the socket, on a free slot, or on the buffer budget.
	held      []*request
	heldBytes int

	// readNanos is a moving average of how long device reads take. While
	// it is low the reader serves small reads itself; see readLoop.
	readNanos atomic.Int64
	inline    bool // reads may be served by the reader (the device does not say it may stall)

	ctxDev  ContextReaderAt // dev, if its reads can be cancelled
	readCtx context.Context // cancelled when the connection is torn down
	raw     syscall.RawConn // conn's socket, to poll for a hang-up; may be nil

	cancelled atomic.Bool           // ctx was cancelled: stop reading, drain
	writeErr  atomic.Pointer[error] // the first failed write: stop reading
	tornDown  atomic.Bool           // drain over: reads cancelled, conn closed

	// The writer role: whoever has a finished reply queues it; if no one is
	// writing, it becomes the writer and sends everything queued, one
	// writev per round, until the queue is empty. Replies that finish while
	// a write is under way ride along in the next round, so a busy
	// connection batches replies, and an idle one sends each reply from the
	// goroutine that produced it, without waking another.
	writeMu sync.Mutex
	writing bool       // under writeMu: someone holds the writer role
	pending []*request // under writeMu: replies waiting to be sent
	spare   []*request // the writer's batch; swapped with pending each round

	// Writer-role state, reused so the hot path does not allocate.
	writeTimeout  time.Duration
	deadlineSetAt time.Time // when the write deadline was last pushed out
	iov           [][]byte
	out           net.Buffers
}

// Internal reasons the reader stopped.
var (
	errDisconnect = errors.New("nbd: disconnect requested") // DISC seen
	errTornDown   = errors.New("nbd: connection torn down") // drain over or aborted
)

// maxRequestSize is the largest request served: MaxRequestSize, or the
// protocol's limit when it is unset or above it.
func (o *TransmissionOptions) maxRequestSize() uint32 {
	if o.MaxRequestSize == 0 || o.MaxRequestSize > MaxRequestSize {
		return MaxRequestSize
	}
	return o.MaxRequestSize
}

// drainTimeout is DrainTimeout, or its default when unset.
func (o *TransmissionOptions) drainTimeout() time.Duration {
	if o.DrainTimeout <= 0 {
		return defaultDrain
	}
	return o.DrainTimeout
}

// budgetFloor raises a buffer budget to hold at least one largest request,
// so that any request can be served.
func budgetFloor(budget int64, maxRequest uint32) int64 {
	return max(budget, bufferSize(int(maxRequest)))
}

func serveTransmission(ctx context.Context, conn net.Conn, in *bufio.Reader, dev Device, opts TransmissionOptions) error {
	handlers := opts.Handlers
	if handlers <= 0 {
		handlers = max(8, 4*runtime.GOMAXPROCS(0))
	}
	maxRequest := opts.maxRequestSize()
	drain := opts.drainTimeout()
	buffers := opts.buffers
	if buffers == nil {
		buffers = new(bufferPool)
	}
	budget := opts.MaxBufferedBytes
	if budget <= 0 {
		budget = defaultBufferedBytes
	}
	budget = budgetFloor(budget, maxRequest)
	log := zerolog.Nop()
	if opts.Logger != nil {
		log = *opts.Logger
	}
	size := dev.Size()
	if size < 0 {
		_ = conn.Close()
		return fmt.Errorf("nbd: device reports negative size %d", size)
	}

	// A socket buffer that holds a few large replies lets one writev hand
	// over a whole reply instead of a part and a wait for the peer; the
	// kernel caps it at net.core.wmem_max.
	if b, ok := conn.(interface{ SetWriteBuffer(int) error }); ok {
		_ = b.SetWriteBuffer(socketWriteBuffer)
	}

	// Twice as many slots as handlers lets the reader queue the next
	// requests while replies are being written.
	slots := 2 * handlers
	e := &engine{
		conn: conn, in: in, dev: dev, size: uint64(size), maxRequest: maxRequest,
		buffers: buffers, budget: newByteBudget(budget), shared: opts.shared, log: log,
		writeTimeout: opts.WriteTimeout,
		free:         make(chan *request, slots),
		work:         make(chan *request, slots),
		pending:      make([]*request, 0, slots),
		held:         make([]*request, 0, slots),
		spare:        make([]*request, 0, slots),
		iov:          make([][]byte, 0, 2*slots),
	}
	for range slots {
		e.free <- new(request)
	}
	e.readNanos.Store(8 * int64(inlineThreshold))
	e.inline = !mayStall(dev)
	e.ctxDev, _ = dev.(ContextReaderAt)
	if sc, ok := conn.(syscall.Conn); ok {
		e.raw, _ = sc.SyscallConn()
	}
	// The reads' context keeps ctx's values but not its cancellation: on
	// cancellation requests already read are still served, for a while.
	readCtx, cancelReads := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelReads()
	e.readCtx = readCtx

	stopWatch := context.AfterFunc(ctx, func() {
		e.cancelled.Store(true)
		// Wake the reader now; give replies already owed a bounded time.
		_ = conn.SetReadDeadline(time.Unix(1, 0))
		_ = conn.SetWriteDeadline(time.Now().Add(drain))
	})
	defer stopWatch()

	var workers sync.WaitGroup
	for range handlers {
		workers.Go(func() {
			for r := range e.work {
				e.serveRead(r)
				e.queue(r)
			}
		})
	}
	// The reader runs on a goroutine of its own so that this one can stop
	// waiting for it: the reader may be stuck in a device read it serves
	// itself, or waiting for a slot or buffer that stuck reads hold.
	var readErr error
	readerDone := make(chan struct{})
	allDone := make(chan struct{})
	go func() {
		readErr = e.readLoop()
		close(readerDone)
		close(e.work)
		// Every reply queued so far is written by the time the handlers
		// are done: the writer role is only given up with an empty queue.
		workers.Wait()
		close(allDone)
	}()
	peerGone := e.await(ctx, opts.abort, drain, readerDone, allDone, func() {
		// Close first, so that no reply to a read failed by its
		// cancellation goes out as EIO: the kernel re-sends an unanswered
		// request on the socket a restarted server attaches.
		_ = conn.Close()
		cancelReads()
	})
	_ = conn.Close()

	// The reader may still be stuck (its result is then unknown), or have
	// stopped only because the teardown closed the connection.
	stoppedByTeardown := true
	select {
	case <-readerDone:
		stoppedByTeardown = errors.Is(readErr, errTornDown)
	default:
	}
	switch {
	case e.writeErr.Load() != nil:
		return fmt.Errorf("nbd: writing reply: %w", *e.writeErr.Load())
	case e.cancelled.Load():
		return nil
	case stoppedByTeardown && peerGone:
		return fmt.Errorf("nbd: peer hung up with device reads in flight: %w", io.EOF)
	case stoppedByTeardown: // aborted (Detach)
		return nil
	case errors.Is(readErr, errDisconnect):
		return nil
	default:
		return readErr
	}
}

// await waits for the connection to finish: for the reader to stop and every
// request it took in to be answered. Once teardown begins (ctx cancelled, or
// the reader stopped: DISC, end of stream, a failed write) requests already
// read get drain to finish, then stop is called, which cancels the device
// reads still running and closes the connection, and those reads get
// cancelGrace to return before they are left behind. A write failure, a
// peer that hung up or a closed abort skip the drain: no reply can reach
// the peer, or the caller wants the connection gone. await reports whether
// it found the peer gone.
func (e *engine) await(ctx context.Context, abort <-chan struct{}, drain time.Duration,
	readerDone, allDone <-chan struct{}, stop func()) (peerGone bool) {
	check := time.NewTicker(peerCheckInterval)
	defer check.Stop()
	var drainTimer *time.Timer
	var drained <-chan time.Time // nil until teardown begins
	beginDrain := func() {
		if drainTimer == nil {
			drainTimer = time.NewTimer(drain)
			drained = drainTimer.C
		}
	}
	defer func() {
		if drainTimer != nil {
			drainTimer.Stop()
		}
	}()
	ctxDone := ctx.Done()
wait:
	for {
		select {
		case <-allDone:
			return false
		case <-readerDone:
			readerDone = nil
			if e.writeErr.Load() != nil {
				break wait
			}
			if e.peerGone() {
				peerGone = true
				break wait
			}
			beginDrain()
		case <-ctxDone:
			ctxDone = nil
			beginDrain()
		case <-check.C:
			// The reader, if it waits elsewhere than on the socket, sees
			// neither a hang-up nor a failed write's deadline.
			if e.peerGone() {
				peerGone = true
				break wait
			}
			if e.writeErr.Load() != nil {
				break wait
			}
		case <-abort:
			break wait
		case <-drained:
			e.log.Warn().Dur("drain_timeout", drain).Int("in_flight", e.inFlight()).
				Msg("nbd: requests not answered within the drain timeout; cancelling their device reads")
			break wait
		}
	}
	e.tornDown.Store(true)
	stop()
	grace := time.NewTimer(cancelGrace)
	defer grace.Stop()
	select {
	case <-allDone:
		return peerGone
	case <-grace.C:
		// A device read that ignores cancellation (or a plain ReadAt) is
		// left to finish on its own; its reply goes nowhere and its buffer
		// returns to the pool only then.
		e.log.Warn().Int("in_flight", e.inFlight()).
			Msg("nbd: device reads did not return after cancellation; leaving them behind")
		return peerGone
	}
}

// peerGone reports whether the peer can take no more replies.
func (e *engine) peerGone() bool { return e.raw != nil && peerHungUp(e.raw) }

// inFlight is how many requests hold a slot: taken in and not yet answered.
func (e *engine) inFlight() int { return cap(e.free) - len(e.free) }

// readLoop is the connection's reader. It pulls request headers until DISC,
// cancellation, a broken stream or a write failure. READs go to the
// handlers, so that a slow one does not hold up the others, except small
// ones while the device is answering fast, which it serves itself;
// everything else is answered from here.
func (e *engine) readLoop() error {
	defer e.releaseHeld()
	for {
		if e.tornDown.Load() {
			return errTornDown // do not start on requests still buffered
		}
		if len(e.held) > 0 && e.in.Buffered() < requestHeaderSize {
			e.releaseHeld() // the next read may wait for the peer
		}
		hdr, err := e.in.Peek(requestHeaderSize)
		if err != nil {
			return e.readError(err, len(hdr))
		}
		if m := binary.BigEndian.Uint32(hdr[0:4]); m != magicRequest {
			return fmt.Errorf("nbd: request magic %#08x, want %#08x: stream out of sync", m, magicRequest)
		}
		flags := binary.BigEndian.Uint16(hdr[4:6])
		cmd := binary.BigEndian.Uint16(hdr[6:8])
		cookie := binary.BigEndian.Uint64(hdr[8:16])
		offset := binary.BigEndian.Uint64(hdr[16:24])
		length := binary.BigEndian.Uint32(hdr[24:28])
		_, _ = e.in.Discard(requestHeaderSize) // cannot fail: Peek saw the bytes

		errno := uint32(0)
		switch cmd {
		case cmdRead:
			switch {
			case flags&^cmdFlagFUA != 0, // no other flag was negotiated
				length == 0,
				length > e.maxRequest,
				offset > e.size, uint64(length) > e.size-offset:
				errno = errInval
			default:
				r := e.slot()
				r.prepare(cookie, 0)
				r.offset, r.length = int64(offset), int(length)
				if e.inline && r.length <= inlineMaxLength && e.readNanos.Load() < int64(inlineThreshold) {
					// The device has been answering quickly: serving this
					// read here costs less than waking a handler for it
					// (on small machines, the switch costs more than the
					// read). Should the device turn slow, this one read
					// holds up the next requests; the average then rises
					// and the following reads go to the handlers again.
					buf := e.tryTakeBuffer(r.length)
					if buf == nil {
						e.releaseHeld() // they hold budget the read may need
						buf = e.takeBuffer(r.length)
					}
					e.readInto(r, buf)
					e.hold(r)
					continue
				}
				e.work <- r
				continue
			}
		case cmdWrite:
			// The payload follows the header whatever we answer; consume
			// it so the next header is where the peer put it.
			e.releaseHeld() // reading the payload may wait for the peer
			if n, err := e.in.Discard(int(length)); err != nil {
				return e.readError(err, requestHeaderSize+n)
			}
			errno = errPerm
		case cmdDisc:
			return errDisconnect
		case cmdFlush:
			// Nothing is ever dirty.
		case cmdTrim, cmdWriteZeroes:
			errno = errPerm
		default: // CACHE and BLOCK_STATUS were not negotiated; the rest is unknown
			errno = errInval
		}
		r := e.slot()
		r.prepare(cookie, errno)
		e.hold(r)
	}
}

// slot takes a free request slot, first releasing held replies if none is
// free (they may be what is holding the slots).
func (e *engine) slot() *request {
	select {
	case r := <-e.free:
		return r
	default:
	}
	e.releaseHeld()
	return <-e.free
}

// hold keeps a reply the reader produced for the next release.
func (e *engine) hold(r *request) {
	e.held = append(e.held, r)
	if r.buf != nil {
		e.heldBytes += r.length
	}
	if len(e.held) >= maxHeldReplies || e.heldBytes >= maxHeldBytes {
		e.releaseHeld()
	}
}

// releaseHeld hands the held replies to the writer.
func (e *engine) releaseHeld() {
	if len(e.held) == 0 {
		return
	}
	e.writeMu.Lock()
	e.pending = append(e.pending, e.held...)
	clear(e.held)
	e.held, e.heldBytes = e.held[:0], 0
	e.writeQueued()
}

// readError explains why reading stopped. partial is how many bytes of the
// current request had arrived.
func (e *engine) readError(err error, partial int) error {
	switch {
	case e.tornDown.Load():
		return errTornDown
	case e.writeErr.Load() != nil, e.cancelled.Load():
		return err // the caller reports the real reason
	case errors.Is(err, io.EOF) && partial == 0:
		return fmt.Errorf("nbd: peer closed the connection without NBD_CMD_DISC: %w", err)
	case errors.Is(err, io.EOF):
		return fmt.Errorf("nbd: peer closed the connection inside a request: %w", io.ErrUnexpectedEOF)
	default:
		return fmt.Errorf("nbd: reading request: %w", err)
	}
}

// serveRead reads one request's data into a pooled buffer. Only a complete
// read is a success; anything else fails this request with EIO.
func (e *engine) serveRead(r *request) {
	e.readInto(r, e.takeBuffer(r.length))
}

// readInto reads r's data into buf, which takeBuffer or tryTakeBuffer gave.
func (e *engine) readInto(r *request, buf *[]byte) {
	data := (*buf)[:r.length]
	var start time.Time
	if e.inline { // only the inline decision uses the average
		start = time.Now()
	}
	n, err := e.readFully(data, r.offset)
	if e.inline {
		e.recordReadTime(time.Since(start))
	}
	if n == len(data) {
		r.buf = buf // io.ReaderAt may return io.EOF with a full buffer
		return
	}
	e.dropBuffer(buf)
	r.setError(errIO)
	if err == nil {
		err = io.ErrShortBuffer
	}
	if e.readCtx.Err() != nil {
		// Cancelled by the teardown, which already said so; the reply is
		// not sent.
		return
	}
	e.log.Warn().Err(err).Int64("offset", r.offset).Int("length", r.length).Msg("nbd: device read failed")
}

// recordReadTime folds one device read's duration into the moving average
// (weight 1/8). Concurrent updates may lose one another's contribution,
// which only makes the average a little less exact.
func (e *engine) recordReadTime(d time.Duration) {
	avg := e.readNanos.Load()
	e.readNanos.Store(avg + (int64(d)-avg)/8)
}

// takeBuffer returns a pooled buffer for n bytes once the connection's (and
// the server's) budget allows it.
func (e *engine) takeBuffer(n int) *[]byte {
	size := bufferSize(n)
	e.budget.acquire(size)
	if e.shared != nil {
		e.shared.acquire(size)
	}
	return e.buffers.get(n)
}

// tryTakeBuffer is takeBuffer without waiting: nil if the budget is short.
func (e *engine) tryTakeBuffer(n int) *[]byte {
	size := bufferSize(n)
	if !e.budget.tryAcquire(size) {
		return nil
	}
	if e.shared != nil && !e.shared.tryAcquire(size) {
		e.budget.release(size)
		return nil
	}
	return e.buffers.get(n)
}

func (e *engine) dropBuffer(b *[]byte) {
	size := int64(cap(*b))
	e.buffers.put(b)
	e.releaseBudget(size)
}

// releaseBudget gives n bytes back to the connection's and the server's
// budgets.
func (e *engine) releaseBudget(n int64) {
	if e.shared != nil {
		e.shared.release(n)
	}
	e.budget.release(n)
}

// readFully reads from the device, through ReadAtContext when it has it,
// turning a panic in the device into an error so one bad request cannot take
// the server down.
func (e *engine) readFully(p []byte, off int64) (n int, err error) {
	defer func() {
		if v := recover(); v != nil {
			n, err = 0, fmt.Errorf("device panicked: %v", v)
		}
	}()
	if e.ctxDev != nil {
		return e.ctxDev.ReadAtContext(e.readCtx, p, off)
	}
	return e.dev.ReadAt(p, off)
}

// queue hands a finished reply to the writer role, taking the role if it is
// free.
func (e *engine) queue(r *request) {
	e.writeMu.Lock()
	e.pending = append(e.pending, r)
	e.writeQueued()
}

// writeQueued takes the writer role if it is free and writes until the
// queue is empty. Called with writeMu held; returns with it released.
func (e *engine) writeQueued() {
	if e.writing {
		e.writeMu.Unlock()
		return
	}
	e.writing = true
	for len(e.pending) > 0 {
		batch := e.pending
		e.pending = e.spare[:0]
		e.writeMu.Unlock()
		e.send(batch)
		clear(batch)
		e.writeMu.Lock()
		e.spare = batch[:0]
	}
	e.writing = false
	e.writeMu.Unlock()
}

// failWrite records the first write failure and stops the reader; a
// function of its own so that only a failure moves err to the heap.
func (e *engine) failWrite(err error) {
	e.writeErr.CompareAndSwap(nil, &err)
	_ = e.conn.SetReadDeadline(time.Unix(1, 0))
}

// send writes a batch of replies with one writev and recycles their slots.
// Only the writer role calls it.
func (e *engine) send(batch []*request) {
	// After the teardown the connection is closed: replies to reads that
	// finished late go nowhere, and that is no write failure.
	if e.writeErr.Load() == nil && !e.tornDown.Load() {
		if e.writeTimeout > 0 && !e.cancelled.Load() {
			// Pushing the deadline out costs a timer update, so do it only
			// when a quarter of the timeout has gone by: every write still
			// gets at least three quarters of it.
			if now := time.Now(); now.Sub(e.deadlineSetAt) > e.writeTimeout/4 {
				_ = e.conn.SetWriteDeadline(now.Add(e.writeTimeout))
				e.deadlineSetAt = now
			}
		}
		iov := e.iov[:0]
		for _, r := range batch {
			iov = append(iov, r.reply[:])
			if r.buf != nil {
				iov = append(iov, (*r.buf)[:r.length])
			}
		}
		e.out = iov
		if _, err := e.out.WriteTo(e.conn); err != nil {
			// The stream is broken: stop the reader; slots keep being
			// recycled so that every handler can finish.
			e.failWrite(err)
		}
		clear(iov)
		e.iov = iov[:0]
	}
	// One budget release for the whole batch: each takes two locks and
	// wakes every waiter.
	var freed int64
	for _, r := range batch {
		if r.buf != nil {
			freed += int64(cap(*r.buf))
			e.buffers.put(r.buf)
			r.buf = nil
		}
		e.free <- r
	}
	if freed > 0 {
		e.releaseBudget(freed)
	}
}
