package nbd

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/rafsnbd/rafsnbd/internal/testutil"
)

// Tests of the teardown bound: however a device read behaves, a cancelled or
// disconnected connection returns within its DrainTimeout (plus the grace for
// cancelled reads), answering the reads that finish in time.

const (
	stuckOff = 32 << 10 // reads covering this offset never return on their own
	slowOff  = 48 << 10 // reads at this offset take slowRead
	slowRead = 100 * time.Millisecond
	// teardownSlack is what a loaded machine (two cores shared with other
	// test binaries, -race) may add to the bound on top of DrainTimeout and
	// cancelGrace; 1 s was seen to be exceeded. Without the bound the wait
	// is endless, so a generous slack still tells.
	teardownSlack = 3 * time.Second
)

// stallDevice serves memDevice's bytes; a read covering stuckOff waits until
// its context is done (ReadAtContext) or until release is closed (ReadAt, the
// uncancellable kind), and then scribbles over its buffer, as a late fetch
// would. A read at slowOff takes slowRead.
type stallDevice struct {
	memDevice
	release  chan struct{}
	stuck    atomic.Int64 // reads that started waiting at stuckOff
	finished atomic.Int64 // reads at stuckOff that returned
	slow     atomic.Int64 // reads at slowOff that started
}

func newStallDevice(seed uint64) *stallDevice {
	return &stallDevice{memDevice: memDevice{data: randomBytes(64<<10, seed)}, release: make(chan struct{})}
}

func (d *stallDevice) read(ctx context.Context, p []byte, off int64) (int, error) {
	switch {
	case off <= stuckOff && stuckOff < off+int64(len(p)):
		d.stuck.Add(1)
		defer d.finished.Add(1)
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-d.release:
			for i := range p {
				p[i] = 0xee
			}
			return len(p), nil
		}
	case off == slowOff:
		d.slow.Add(1)
		time.Sleep(slowRead)
	}
	return d.memDevice.ReadAt(p, off)
}

// plainStallDevice has only ReadAt: its stuck read cannot be cancelled.
type plainStallDevice struct{ *stallDevice }

func (d plainStallDevice) ReadAt(p []byte, off int64) (int, error) {
	return d.read(context.Background(), p, off)
}

// ctxStallDevice has ReadAtContext and says it may stall.
type ctxStallDevice struct{ *stallDevice }

func (d ctxStallDevice) ReadAtContext(ctx context.Context, p []byte, off int64) (int, error) {
	return d.read(ctx, p, off)
}

func (d ctxStallDevice) ReadAt(p []byte, off int64) (int, error) {
	return 0, errors.New("ReadAt used on a device with ReadAtContext")
}

func (d ctxStallDevice) MayStall() bool { return true }

// stallVariants are the two kinds of device whose read never returns.
func stallVariants(seed uint64) map[string]func() (Device, *stallDevice) {
	return map[string]func() (Device, *stallDevice){
		"ReadAtContext": func() (Device, *stallDevice) { d := newStallDevice(seed); return ctxStallDevice{d}, d },
		"ReadAt":        func() (Device, *stallDevice) { d := newStallDevice(seed); return plainStallDevice{d}, d },
	}
}

// checkLeftBehind checks what became of the stuck read after the engine
// returned: cancelled (ReadAtContext), or still running until released, after
// which its goroutines end (ReadAt).
func checkLeftBehind(t *testing.T, name string, d *stallDevice, goroutines int) {
	t.Helper()
	if name == "ReadAtContext" {
		if d.finished.Load() != d.stuck.Load() {
			t.Fatalf("%d stuck reads, %d returned: the context was not cancelled", d.stuck.Load(), d.finished.Load())
		}
		return
	}
	if d.finished.Load() != 0 {
		t.Fatal("the uncancellable read returned before its release")
	}
	close(d.release)
	waitFor(t, "the released read", func() bool { return d.finished.Load() == d.stuck.Load() })
	waitFor(t, "the connection's goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutines })
}

// returnedWithin waits for ServeTransmission's result and checks how long it
// took from start.
func returnedWithin(t *testing.T, done <-chan error, start time.Time, min, max time.Duration) error {
	t.Helper()
	select {
	case err := <-done:
		took := time.Since(start)
		t.Logf("returned after %v (bound %v)", took.Round(time.Millisecond), max)
		if took < min || took > max {
			t.Fatalf("returned after %v, want %v..%v", took, min, max)
		}
		return err
	case <-time.After(max + 10*time.Second):
		t.Fatalf("did not return within %v", max)
		return nil
	}
}

// TestTeardownCancelWithStuckRead cancels the context with a read stuck in
// the device and a slow one in flight: the slow one is answered, the stuck
// one gets the drain timeout and then no reply, and ServeTransmission
// returns nil within DrainTimeout.
func TestTeardownCancelWithStuckRead(t *testing.T) {
	for name, variant := range stallVariants(51) {
		t.Run(name, func(t *testing.T) {
			goroutines := runtime.NumGoroutine()
			dev, d := variant()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			const drain = 400 * time.Millisecond
			c, done := startEngine(t, ctx, dev, TransmissionOptions{Handlers: 4, DrainTimeout: drain})
			c.send(t, 0, cmdRead, 100, stuckOff, 4096, nil)
			waitFor(t, "the stuck read", func() bool { return d.stuck.Load() == 1 })
			for i := range 4 {
				off := uint64(i) * 4096
				checkBytes(t, c.read(t, uint64(i), off, 4096), d.data[off:off+4096], "read beside a stuck one")
			}
			c.send(t, 0, cmdRead, 200, slowOff, 4096, nil)
			waitFor(t, "the slow read", func() bool { return d.slow.Load() == 1 })
			start := time.Now()
			cancel()
			c.expectReply(t, 0, 200)
			checkBytes(t, c.data(t, 4096), d.data[slowOff:slowOff+4096], "slow read drained on cancel")
			c.expectEOF(t) // and no reply to the stuck read
			if err := returnedWithin(t, done, start, drain, drain+cancelGrace+teardownSlack); err != nil {
				t.Fatalf("ServeTransmission returned %v, want nil after cancellation", err)
			}
			_ = c.conn.Close()
			checkLeftBehind(t, name, d, goroutines)
		})
	}
}

// TestTeardownDiscWithStuckRead: after NBD_CMD_DISC from a peer that stays
// connected, a stuck read gets the drain timeout, then the connection closes
// without its reply.
func TestTeardownDiscWithStuckRead(t *testing.T) {
	for name, variant := range stallVariants(52) {
		t.Run(name, func(t *testing.T) {
			goroutines := runtime.NumGoroutine()
			dev, d := variant()
			const drain = 300 * time.Millisecond
			c, done := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 2, DrainTimeout: drain})
			c.send(t, 0, cmdRead, 100, stuckOff-1024, 4096, nil)
			waitFor(t, "the stuck read", func() bool { return d.stuck.Load() == 1 })
			checkBytes(t, c.read(t, 1, 0, 512), d.data[:512], "read beside a stuck one")
			start := time.Now()
			c.send(t, 0, cmdDisc, 0, 0, 0, nil)
			c.expectEOF(t) // and no reply to the stuck read
			if err := returnedWithin(t, done, start, drain, drain+cancelGrace+teardownSlack); err != nil {
				t.Fatalf("ServeTransmission returned %v, want nil after DISC", err)
			}
			_ = c.conn.Close()
			checkLeftBehind(t, name, d, goroutines)
		})
	}
}

// TestTeardownPeerHangsUp: a peer that closes its socket while the reader is
// blocked (every slot held by stuck reads) is noticed without a read from
// the socket, and the engine returns long before its drain timeout.
func TestTeardownPeerHangsUp(t *testing.T) {
	for name, variant := range stallVariants(53) {
		t.Run(name, func(t *testing.T) {
			goroutines := runtime.NumGoroutine()
			dev, d := variant()
			// One handler, two slots: the third stuck read leaves the reader
			// waiting for a slot, away from the socket.
			c, done := startEngine(t, context.Background(), dev, TransmissionOptions{Handlers: 1, DrainTimeout: time.Minute})
			for i := range 3 {
				c.send(t, 0, cmdRead, uint64(100+i), stuckOff, 512, nil)
			}
			waitFor(t, "the stuck read", func() bool { return d.stuck.Load() == 1 })
			time.Sleep(20 * time.Millisecond) // the reader takes in the other two
			start := time.Now()
			_ = c.conn.Close()
			err := returnedWithin(t, done, start, 0, peerCheckInterval+cancelGrace+teardownSlack)
			if !errors.Is(err, io.EOF) {
				t.Fatalf("ServeTransmission returned %v, want an error wrapping io.EOF", err)
			}
			checkLeftBehind(t, name, d, goroutines)
		})
	}
}

// logLines is a zerolog destination tests can search.
type logLines struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.Write(p)
}

func (l *logLines) contains(s string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Contains(l.buf.String(), s)
}

// TestTeardownServerKeepsLeftBehindBuffer: a connection whose uncancellable
// read was left behind must not give that read's buffer back to the server's
// shared pool while the read can still write into it. Another connection
// keeps reading (same buffer size class) while the left-behind read finishes
// by scribbling over its buffer; its bytes must stay right (and -race must
// stay quiet).
func TestTeardownServerKeepsLeftBehindBuffer(t *testing.T) {
	d := newStallDevice(54)
	var logs logLines
	log := zerolog.New(&logs)
	path, _, _ := startServer(t, &Server{Exports: []Export{{Name: "s", Device: plainStallDevice{d}}}, Logger: &log,
		Transmission: TransmissionOptions{Handlers: 2}})

	a, _ := dial(t, path, clientFixedNewstyle|clientNoZeroes).goTransmission(t, "s")
	a.send(t, 0, cmdRead, 1, stuckOff, 4096, nil)
	waitFor(t, "the stuck read", func() bool { return d.stuck.Load() == 1 })
	_ = a.conn.Close()
	waitFor(t, "the read to be left behind", func() bool { return logs.contains("leaving them behind") })

	b, _ := dial(t, path, clientFixedNewstyle|clientNoZeroes).goTransmission(t, "s")
	for i := range 200 {
		if i == 20 {
			close(d.release)
		}
		off := uint64(i%8) * 4096
		checkBytes(t, b.read(t, uint64(i), off, 4096), d.data[off:off+4096], "read while a left-behind one finishes")
	}
	waitFor(t, "the released read", func() bool { return d.finished.Load() == 1 })
}

// TestClientsServerShutdownWithStuckRead: nbdcopy reads an export whose
// device never answers one of its reads; cancelling the server returns
// within the drain timeout, and nbdcopy fails instead of hanging.
func TestClientsServerShutdownWithStuckRead(t *testing.T) {
	testutil.RequireTool(t, "nbdcopy")
	for name, variant := range stallVariants(55) {
		t.Run(name, func(t *testing.T) {
			dev, d := variant()
			const drain = 500 * time.Millisecond
			path, cancel, served := startServer(t, &Server{Exports: []Export{{Name: "s", Device: dev}},
				Transmission: TransmissionOptions{DrainTimeout: drain}})
			copyCtx, stopCopy := context.WithTimeout(context.Background(), time.Minute)
			defer stopCopy()
			cmd := exec.CommandContext(copyCtx, "nbdcopy", "nbd+unix:///s?socket="+path, "null:")
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			copied := make(chan error, 1)
			go func() { copied <- cmd.Wait() }()
			waitFor(t, "nbdcopy's read to get stuck", func() bool { return d.stuck.Load() >= 1 })
			start := time.Now()
			cancel()
			select {
			case err := <-served:
				took := time.Since(start)
				t.Logf("Serve returned after %v (bound %v)", took.Round(time.Millisecond), drain+cancelGrace+teardownSlack)
				if err != nil {
					t.Fatalf("Serve returned %v", err)
				}
				if took > drain+cancelGrace+teardownSlack {
					t.Fatalf("Serve returned after %v, want at most %v", took, drain+cancelGrace+teardownSlack)
				}
			case <-time.After(drain + 15*time.Second):
				t.Fatal("Serve did not return after cancellation")
			}
			select {
			case err := <-copied:
				if err == nil {
					t.Fatal("nbdcopy succeeded although a read was never answered")
				}
				t.Logf("nbdcopy: %v: %s", err, strings.TrimSpace(stderr.String()))
			case <-time.After(10 * time.Second):
				t.Fatal("nbdcopy still running after the server stopped")
			}
			if name == "ReadAt" {
				close(d.release)
			}
		})
	}
}
