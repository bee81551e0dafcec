package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// TestServeTransmissionPipelinedReads sends a burst of reads without waiting
// and checks every reply, matched by cookie, carries the right bytes.
func TestServeTransmissionPipelinedReads(t *testing.T) {
	dev := &memDevice{data: randomBytes(1<<20+123, 1)} // odd size: the tail is not block aligned
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 4})

	type want struct{ off, length int }
	rng := rand.New(rand.NewPCG(1, 2))
	wants := map[uint64]want{}
	var msg []byte
	for i := range 300 {
		length := 1 + rng.IntN(64<<10)
		off := rng.IntN(len(dev.data) - length + 1)
		cookie := uint64(i)<<32 | 0xabcd // distinct high and low halves
		wants[cookie] = want{off, length}
		msg = encodeRequest(msg, 0, cmdRead, cookie, uint64(off), uint32(length))
	}
	// The last byte, alone.
	wants[999] = want{len(dev.data) - 1, 1}
	msg = encodeRequest(msg, 0, cmdRead, 999, uint64(len(dev.data)-1), 1)

	sendErr := make(chan error, 1)
	go func() { _, err := c.conn.Write(msg); sendErr <- err }()
	for range len(wants) {
		errno, cookie := c.reply(t)
		w, ok := wants[cookie]
		if !ok {
			t.Fatalf("reply for unknown or repeated cookie %#x", cookie)
		}
		delete(wants, cookie)
		if errno != 0 {
			t.Fatalf("cookie %#x: errno %d", cookie, errno)
		}
		checkBytes(t, c.data(t, w.length), dev.data[w.off:w.off+w.length], fmt.Sprintf("read %d+%d", w.off, w.length))
	}
	if err := <-sendErr; err != nil {
		t.Fatal(err)
	}
	c.send(t, 0, cmdDisc, 0, 0, 0, nil)
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return err == nil }, "nil after DISC")
}

// TestServeTransmissionRejectsWithoutDesync sends every kind of request the
// engine must refuse, each followed by a good READ that proves the stream is
// still in step.
func TestServeTransmissionRejectsWithoutDesync(t *testing.T) {
	dev := &memDevice{data: randomBytes(1<<16, 2)}
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{})
	size := uint64(len(dev.data))

	cases := []struct {
		name    string
		flags   uint16
		cmd     uint16
		offset  uint64
		length  uint32
		payload []byte
		errno   uint32
	}{
		{"write is refused and its payload skipped", 0, cmdWrite, 0, 4096, randomBytes(4096, 9), errPerm},
		{"write with FUA", cmdFlagFUA, cmdWrite, 512, 3, []byte{1, 2, 3}, errPerm},
		{"empty write", 0, cmdWrite, 0, 0, nil, errPerm},
		{"write out of range", 0, cmdWrite, size, 7, []byte("payload"), errPerm},
		{"trim", 0, cmdTrim, 0, 4096, nil, errPerm},
		{"write zeroes", 0, cmdWriteZeroes, 0, 1 << 30, nil, errPerm},
		{"flush", 0, cmdFlush, 0, 0, nil, 0},
		{"cache was not negotiated", 0, cmdCache, 0, 4096, nil, errInval},
		{"block status was not negotiated", 0, cmdBlockStatus, 0, 4096, nil, errInval},
		{"unknown command", 0, 99, 0, 4096, nil, errInval},
		{"unknown command with huge length", 0, 0xffff, 0, 0xffffffff, nil, errInval},
		{"read with unknown flag", 1 << 7, cmdRead, 0, 512, nil, errInval},
		{"read with DF (no structured replies)", 1 << 2, cmdRead, 0, 512, nil, errInval},
		{"zero-length read", 0, cmdRead, 0, 0, nil, errInval},
		{"read past the end", 0, cmdRead, size - 511, 512, nil, errInval},
		{"read starting at the end", 0, cmdRead, size, 1, nil, errInval},
		{"read with huge offset", 0, cmdRead, 1 << 63, 512, nil, errInval},
		{"read whose end overflows", 0, cmdRead, ^uint64(0) - 10, 512, nil, errInval},
		{"read over 32 MiB", 0, cmdRead, 0, MaxRequestSize + 1, nil, errInval},
	}
	for i, tc := range cases {
		cookie := uint64(1000 + i)
		c.send(t, tc.flags, tc.cmd, cookie, tc.offset, tc.length, tc.payload)
		errno, got := c.reply(t)
		if errno != tc.errno || got != cookie {
			t.Fatalf("%s: errno %d cookie %d, want errno %d cookie %d", tc.name, errno, got, tc.errno, cookie)
		}
		off := uint64(i * 997 % (len(dev.data) - 100))
		checkBytes(t, c.read(t, cookie+1<<40, off, 100), dev.data[off:off+100], tc.name+": following read")
	}
	// A FUA flag on a read is harmless and accepted.
	c.send(t, cmdFlagFUA, cmdRead, 7, 10, 10, nil)
	c.expectReply(t, 0, 7)
	checkBytes(t, c.data(t, 10), dev.data[10:20], "read with FUA")

	c.send(t, 0, cmdDisc, 0, 0, 0, nil)
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return err == nil }, "nil after DISC")
}

// TestServeTransmissionLargestRequest reads exactly 32 MiB in one request.
func TestServeTransmissionLargestRequest(t *testing.T) {
	testutil.SkipShort(t)
	dev := &memDevice{data: randomBytes(MaxRequestSize+4096, 3)}
	c, _ := startEngine(t, context.Background(), dev, TransmissionOptions{})
	checkBytes(t, c.read(t, 1, 4096, MaxRequestSize), dev.data[4096:], "32 MiB read")
	c.send(t, 0, cmdRead, 2, 0, MaxRequestSize+1, nil)
	c.expectReply(t, errInval, 2)
	checkBytes(t, c.read(t, 3, 0, 512), dev.data[:512], "read after refused 32 MiB+1")

	// A smaller configured limit is honoured.
	c2, _ := startEngine(t, context.Background(), dev, TransmissionOptions{MaxRequestSize: 1 << 20})
	c2.send(t, 0, cmdRead, 4, 0, 1<<20+1, nil)
	c2.expectReply(t, errInval, 4)
	checkBytes(t, c2.read(t, 5, 0, 1<<20), dev.data[:1<<20], "1 MiB read at a 1 MiB limit")
}

// failingDevice fails reads that touch [badOff, badOff+badLen) and can be
// told to panic instead.
type failingDevice struct {
	memDevice
	badOff, badLen int64
	panics         bool
}

func (d *failingDevice) ReadAt(p []byte, off int64) (int, error) {
	if off < d.badOff+d.badLen && off+int64(len(p)) > d.badOff {
		if d.panics {
			panic("simulated device bug")
		}
		return 0, errors.New("simulated backend failure")
	}
	return d.memDevice.ReadAt(p, off)
}

// TestServeTransmissionDeviceErrorIsPerRequest checks a failing or panicking
// device read costs only that request an EIO.
func TestServeTransmissionDeviceErrorIsPerRequest(t *testing.T) {
	for _, panics := range []bool{false, true} {
		t.Run(fmt.Sprintf("panics=%v", panics), func(t *testing.T) {
			dev := &failingDevice{memDevice: memDevice{data: randomBytes(1<<16, 4)}, badOff: 8192, badLen: 4096, panics: panics}
			c, done := startEngine(t, context.Background(), dev, TransmissionOptions{})
			c.send(t, 0, cmdRead, 1, 8192, 4096, nil)
			c.expectReply(t, errIO, 1)
			checkBytes(t, c.read(t, 2, 0, 8192), dev.data[:8192], "read before the bad range")
			c.send(t, 0, cmdRead, 3, 12000, 200, nil) // straddles the end of the bad range
			c.expectReply(t, errIO, 3)
			checkBytes(t, c.read(t, 4, 12288, 4096), dev.data[12288:16384], "read after the bad range")
			c.send(t, 0, cmdDisc, 0, 0, 0, nil)
			c.expectEOF(t)
			wantResult(t, done, func(err error) bool { return err == nil }, "nil after DISC")
		})
	}
}

// shortDevice returns fewer bytes than asked with no error, which io.ReaderAt
// forbids; the engine must not send a success for it.
type shortDevice struct{ memDevice }

func (d *shortDevice) ReadAt(p []byte, off int64) (int, error) {
	return copy(p[:len(p)/2], d.data[off:]), nil
}

// eofDevice returns a full buffer together with io.EOF, which io.ReaderAt
// allows at the end of the data.
type eofDevice struct{ memDevice }

func (d *eofDevice) ReadAt(p []byte, off int64) (int, error) {
	n := copy(p, d.data[off:])
	return n, io.EOF
}

func TestServeTransmissionReaderAtContract(t *testing.T) {
	data := randomBytes(8192, 5)
	c, _ := startEngine(t, context.Background(), &shortDevice{memDevice{data}}, TransmissionOptions{})
	c.send(t, 0, cmdRead, 1, 0, 4096, nil)
	c.expectReply(t, errIO, 1)

	c2, _ := startEngine(t, context.Background(), &eofDevice{memDevice{data}}, TransmissionOptions{})
	checkBytes(t, c2.read(t, 2, 4096, 4096), data[4096:], "full read with io.EOF")
}

func TestServeTransmissionBadMagicCloses(t *testing.T) {
	dev := &memDevice{data: randomBytes(4096, 6)}
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{})
	checkBytes(t, c.read(t, 1, 0, 16), dev.data[:16], "read before garbage")
	if _, err := c.conn.Write([]byte("GET / HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n")); err != nil {
		t.Fatal(err)
	}
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return err != nil && !errors.Is(err, io.EOF) }, "a bad-magic error")
}

func TestServeTransmissionTruncatedHeader(t *testing.T) {
	dev := &memDevice{data: randomBytes(4096, 6)}
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{})
	hdr := encodeRequest(nil, 0, cmdRead, 1, 0, 16)
	if _, err := c.conn.Write(hdr[:20]); err != nil {
		t.Fatal(err)
	}
	_ = c.conn.(*net.UnixConn).CloseWrite()
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return errors.Is(err, io.ErrUnexpectedEOF) }, "io.ErrUnexpectedEOF")
}

// gatedDevice blocks every read until the gate is closed, and counts the
// reads that have started.
type gatedDevice struct {
	memDevice
	gate    chan struct{}
	started atomic.Int64
}

func (d *gatedDevice) ReadAt(p []byte, off int64) (int, error) {
	d.started.Add(1)
	<-d.gate
	return d.memDevice.ReadAt(p, off)
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestServeTransmissionDiscDrainsInFlight sends DISC while reads are stuck in
// the device and queued behind it: every one of them must still be answered
// before the connection closes.
func TestServeTransmissionDiscDrainsInFlight(t *testing.T) {
	dev := &gatedDevice{memDevice: memDevice{data: randomBytes(1<<16, 7)}, gate: make(chan struct{})}
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 3})
	const n = 10
	for i := range n {
		c.send(t, 0, cmdRead, uint64(i), uint64(i*4096), 4096, nil)
	}
	waitFor(t, "3 device reads in flight", func() bool { return dev.started.Load() == 3 })
	c.send(t, 0, cmdDisc, 0, 0, 0, nil)
	// Give the engine time to see DISC while the reads are still blocked.
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("ServeTransmission returned %v with replies still owed", err)
	default:
	}
	close(dev.gate)
	seen := map[uint64]bool{}
	for range n {
		errno, cookie := c.reply(t)
		if errno != 0 || cookie >= n || seen[cookie] {
			t.Fatalf("reply errno %d cookie %d", errno, cookie)
		}
		seen[cookie] = true
		checkBytes(t, c.data(t, 4096), dev.data[cookie*4096:(cookie+1)*4096], "drained read")
	}
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return err == nil }, "nil after DISC")
}

// TestServeTransmissionHalfClose: a client that sends its requests and shuts
// its write side still gets every reply.
func TestServeTransmissionHalfClose(t *testing.T) {
	dev := &memDevice{data: randomBytes(1<<18, 8)}
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{})
	const n = 50
	var msg []byte
	for i := range n {
		msg = encodeRequest(msg, 0, cmdRead, uint64(i), uint64(i*4096), 4096)
	}
	if _, err := c.conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	if err := c.conn.(*net.UnixConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	for range n {
		errno, cookie := c.reply(t)
		if errno != 0 || cookie >= n {
			t.Fatalf("reply errno %d cookie %d", errno, cookie)
		}
		checkBytes(t, c.data(t, 4096), dev.data[cookie*4096:(cookie+1)*4096], "read before half-close")
	}
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return errors.Is(err, io.EOF) }, "an error wrapping io.EOF")
}

// TestServeTransmissionCancelDrains cancels the context with reads in the
// device: they are answered, then the connection closes and the result is nil.
func TestServeTransmissionCancelDrains(t *testing.T) {
	dev := &gatedDevice{memDevice: memDevice{data: randomBytes(1<<16, 9)}, gate: make(chan struct{})}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c, done := startEngine(t, ctx, dev, TransmissionOptions{Handlers: 2})
	// One write, so the server takes in all four with its first read: only
	// requests already read are answered after cancellation.
	var msg []byte
	for i := range 4 {
		msg = encodeRequest(msg, 0, cmdRead, uint64(i), uint64(i*4096), 4096)
	}
	if _, err := c.conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "2 device reads in flight", func() bool { return dev.started.Load() == 2 })
	cancel()
	time.Sleep(20 * time.Millisecond)
	close(dev.gate)
	for range 4 {
		errno, cookie := c.reply(t)
		if errno != 0 || cookie >= 4 {
			t.Fatalf("reply errno %d cookie %d", errno, cookie)
		}
		checkBytes(t, c.data(t, 4096), dev.data[cookie*4096:(cookie+1)*4096], "read drained on cancel")
	}
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return err == nil }, "nil after cancellation")
}

// TestServeTransmissionPeerGone: the client sends a burst and disappears; the
// engine must notice the failed write, stop, and not hang.
func TestServeTransmissionPeerGone(t *testing.T) {
	dev := &memDevice{data: randomBytes(4<<20, 10)}
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{})
	var msg []byte
	for i := range 200 {
		msg = encodeRequest(msg, 0, cmdRead, uint64(i), 0, 1<<20)
	}
	if _, err := c.conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	_ = c.conn.Close()
	wantResult(t, done, func(err error) bool { return err != nil }, "a write error")
}

// TestServeTransmissionConcurrentSenders hammers one connection from several
// goroutines, as the kernel's blk-mq does with up to 128 tags per socket.
func TestServeTransmissionConcurrentSenders(t *testing.T) {
	dev := &memDevice{data: randomBytes(8<<20, 11)}
	c, _ := startEngine(t, context.Background(), dev, TransmissionOptions{})
	const senders, each = 8, 64
	var wg sync.WaitGroup
	for s := range senders {
		wg.Go(func() {
			for i := range each {
				cookie := uint64(s*each + i)
				c.send(t, 0, cmdRead, cookie, cookie*4096*3%uint64(len(dev.data)-8192), 8192, nil)
			}
		})
	}
	for range senders * each {
		errno, cookie := c.reply(t)
		if errno != 0 {
			t.Fatalf("cookie %d: errno %d", cookie, errno)
		}
		off := cookie * 4096 * 3 % uint64(len(dev.data)-8192)
		checkBytes(t, c.data(t, 8192), dev.data[off:off+8192], "concurrent read")
	}
	wg.Wait()
}

// TestServeTransmissionNoAllocs proves the steady-state request path (read
// header, hand to a handler, device read, writev reply) does not allocate.
func TestServeTransmissionNoAllocs(t *testing.T) {
	dev := &memDevice{data: randomBytes(1<<20, 12)}
	c, _ := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 4})
	req := encodeRequest(nil, 0, cmdRead, 42, 8192, 4096)
	reply := make([]byte, replyHeaderSize+4096)
	roundTrip := func() {
		if _, err := c.conn.Write(req); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(c.conn, reply); err != nil {
			t.Fatal(err)
		}
	}
	for range 100 { // warm the pools
		roundTrip()
	}
	checkBytes(t, reply[replyHeaderSize:], dev.data[8192:12288], "reply data")
	if allocs := testing.AllocsPerRun(1000, roundTrip); allocs != 0 {
		t.Fatalf("%.2f allocations per request, want 0", allocs)
	}
}

// slowSpotDevice blocks reads at one offset until released; others are
// immediate.
type slowSpotDevice struct {
	memDevice
	slowOff int64
	release chan struct{}
}

func (d *slowSpotDevice) ReadAt(p []byte, off int64) (int, error) {
	if off == d.slowOff {
		<-d.release
	}
	return d.memDevice.ReadAt(p, off)
}

// TestServeTransmissionOutOfOrder: a read stuck in the device (a cold fetch)
// must not hold up the reads sent after it; its reply comes last.
func TestServeTransmissionOutOfOrder(t *testing.T) {
	dev := &slowSpotDevice{memDevice: memDevice{data: randomBytes(1<<16, 13)}, slowOff: 0, release: make(chan struct{})}
	c, _ := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 4})
	c.send(t, 0, cmdRead, 100, 0, 4096, nil)
	for i := 1; i <= 20; i++ {
		c.send(t, 0, cmdRead, uint64(i), uint64(i*512), 512, nil)
		c.expectReply(t, 0, uint64(i))
		checkBytes(t, c.data(t, 512), dev.data[i*512:(i+1)*512], "read behind a stuck one")
	}
	close(dev.release)
	c.expectReply(t, 0, 100)
	checkBytes(t, c.data(t, 4096), dev.data[:4096], "the stuck read")
}

// countingDevice counts reads that reached the device.
type countingDevice struct {
	memDevice
	reads atomic.Int64
}

func (d *countingDevice) ReadAt(p []byte, off int64) (int, error) {
	d.reads.Add(1)
	return d.memDevice.ReadAt(p, off)
}

// TestServeTransmissionBufferBudget: a peer that asks for many large reads
// and takes no replies makes the server hold at most the connection's buffer
// budget; the rest of the requests wait, and all are answered once the peer
// reads.
func TestServeTransmissionBufferBudget(t *testing.T) {
	const n, size, budget = 100, 1 << 20, 4 << 20
	dev := &countingDevice{memDevice: memDevice{data: randomBytes(8<<20, 14)}}
	c, _ := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 64, MaxBufferedBytes: budget, MaxRequestSize: size})
	var msg []byte
	for i := range n {
		msg = encodeRequest(msg, 0, cmdRead, uint64(i), uint64(i%8)*size, size)
	}
	if _, err := c.conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	last := waitForStall(&dev.reads)
	held := last - int64(queuedReplies(t, c.conn, size))
	t.Logf("%d reads served, %d held by the server", last, held)
	if held > budget/size+1 {
		t.Fatalf("server holds %d replies of 1 MiB while the peer takes none; budget is 4 MiB", held)
	}
	if last == n {
		t.Fatalf("all %d reads were served without the peer reading: the test proves nothing", n)
	}
	for range n {
		errno, cookie := c.reply(t)
		if errno != 0 {
			t.Fatalf("cookie %d: errno %d", cookie, errno)
		}
		off := (cookie % 8) * size
		checkBytes(t, c.data(t, size), dev.data[off:off+size], "budgeted read")
	}
}

// waitForStall waits until a counter stops moving and returns its value.
func waitForStall(counter *atomic.Int64) int64 {
	last := int64(-1)
	for counter.Load() != last {
		last = counter.Load()
		time.Sleep(200 * time.Millisecond)
	}
	return last
}

// queuedReplies counts the whole replies of size bytes waiting in conn's
// receive queue: those are the kernel's memory, not the server's.
func queuedReplies(t testing.TB, conn net.Conn, size int) int {
	t.Helper()
	raw, err := conn.(*net.UnixConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var queued int
	var ioctlErr error
	if err := raw.Control(func(fd uintptr) { queued, ioctlErr = unix.IoctlGetInt(int(fd), unix.SIOCINQ) }); err != nil || ioctlErr != nil {
		t.Fatalf("SIOCINQ: %v %v", err, ioctlErr)
	}
	return queued / (size + replyHeaderSize)
}

// switchableDevice blocks reads at slowOff while a gate is set, and counts
// the reads that have finished.
type switchableDevice struct {
	memDevice
	slowOff int64
	gate    atomic.Pointer[chan struct{}]
}

func (d *switchableDevice) ReadAt(p []byte, off int64) (int, error) {
	if g := d.gate.Load(); g != nil && off == d.slowOff {
		<-*g
	}
	return d.memDevice.ReadAt(p, off)
}

// TestServeTransmissionAdaptsToSlowDevice: after a run of fast reads the
// reader serves reads itself, so one read that suddenly turns slow holds up
// the requests behind it (the documented price); once it finishes, the
// engine has seen the device is slow and the next stuck read no longer holds
// anything up.
func TestServeTransmissionAdaptsToSlowDevice(t *testing.T) {
	dev := &switchableDevice{memDevice: memDevice{data: randomBytes(1<<16, 15)}, slowOff: 60 << 10}
	c, _ := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 4})
	for i := range 64 { // a warm streak: the device is fast
		off := uint64(i%32) * 1024
		checkBytes(t, c.read(t, uint64(i), off, 1024), dev.data[off:off+1024], "warm read")
	}

	gate := make(chan struct{})
	dev.gate.Store(&gate)
	c.send(t, 0, cmdRead, 1000, 60<<10, 1024, nil) // served inline, stuck
	c.send(t, 0, cmdRead, 1001, 0, 1024, nil)      // waits behind it
	time.Sleep(50 * time.Millisecond)
	close(gate) // the stuck read took 50 ms
	// The reader served the stuck read itself, so the one behind it was
	// read, and answered, only afterwards.
	c.expectReply(t, 0, 1000)
	c.data(t, 1024)
	c.expectReply(t, 0, 1001)
	c.data(t, 1024)

	// The engine now knows the device can be slow: a stuck read goes to a
	// handler and later reads overtake it.
	gate2 := make(chan struct{})
	dev.gate.Store(&gate2)
	c.send(t, 0, cmdRead, 2000, 60<<10, 1024, nil)
	for i := range 10 {
		off := uint64(i) * 1024
		checkBytes(t, c.read(t, uint64(2001+i), off, 1024), dev.data[off:off+1024], "read overtaking a slow one")
	}
	close(gate2)
	c.expectReply(t, 0, 2000)
	checkBytes(t, c.data(t, 1024), dev.data[60<<10:61<<10], "the slow read")
}

// stallingDevice is a switchableDevice that says its reads may stall.
type stallingDevice struct{ switchableDevice }

func (d *stallingDevice) MayStall() bool { return true }

// With a device whose MayStall is true, no warm streak makes the reader serve
// reads itself: a read stuck in the device is overtaken by the ones behind it.
func TestServeTransmissionDeviceMayStall(t *testing.T) {
	sd := &stallingDevice{switchableDevice{memDevice: memDevice{data: randomBytes(1<<16, 17)}, slowOff: 60 << 10}}
	dev := &sd.switchableDevice
	c, _ := startEngine(t, context.Background(), sd, TransmissionOptions{Handlers: 4})
	for i := range 64 {
		off := uint64(i%32) * 1024
		checkBytes(t, c.read(t, uint64(i), off, 1024), dev.data[off:off+1024], "warm read")
	}
	gate := make(chan struct{})
	dev.gate.Store(&gate)
	c.send(t, 0, cmdRead, 1000, 60<<10, 1024, nil) // stuck in the device
	for i := range 10 {
		off := uint64(i) * 1024
		checkBytes(t, c.read(t, uint64(1001+i), off, 1024), dev.data[off:off+1024], "read overtaking a stuck one")
	}
	close(gate)
	c.expectReply(t, 0, 1000)
	checkBytes(t, c.data(t, 1024), dev.data[60<<10:61<<10], "the stuck read")
}

// TestServeTransmissionBurstThenDisc: once reads are served on the reader,
// replies to a burst are held back to share a writev; DISC right after the
// burst must still get every one of them out.
func TestServeTransmissionBurstThenDisc(t *testing.T) {
	dev := &memDevice{data: randomBytes(1<<16, 16)}
	c, done := startEngine(t, context.Background(), dev, TransmissionOptions{})
	for i := range 32 { // warm up: the device is fast
		c.read(t, uint64(i), 0, 512)
	}
	var msg []byte
	for i := range 40 {
		msg = encodeRequest(msg, 0, cmdRead, uint64(100+i), uint64(i*1024), 1024)
	}
	msg = encodeRequest(msg, 0, cmdWrite, 200, 0, 3) // a header-only reply in the burst
	msg = append(msg, 1, 2, 3)
	msg = encodeRequest(msg, 0, cmdDisc, 0, 0, 0)
	if _, err := c.conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	for range 41 {
		errno, cookie := c.reply(t)
		if cookie == 200 {
			if errno != errPerm {
				t.Fatalf("write: errno %d", errno)
			}
			continue
		}
		if errno != 0 || cookie < 100 || cookie >= 140 {
			t.Fatalf("reply errno %d cookie %d", errno, cookie)
		}
		i := int(cookie - 100)
		checkBytes(t, c.data(t, 1024), dev.data[i*1024:(i+1)*1024], "burst read")
	}
	c.expectEOF(t)
	wantResult(t, done, func(err error) bool { return err == nil }, "nil after DISC")
}
