package nbd

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// startServer serves exports on a fresh unix socket and returns its path.
// The server is cancelled and waited for at cleanup.
func startServer(t testing.TB, s *Server) (path string, cancel context.CancelFunc, served <-chan error) {
	t.Helper()
	path = filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	cancel, served = serveOn(t, s, l)
	return path, cancel, served
}

func serveOn(t testing.TB, s *Server, l net.Listener) (context.CancelFunc, <-chan error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		done <- s.Serve(ctx, l)
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case <-finished:
		case <-time.After(15 * time.Second):
			t.Errorf("Server.Serve did not return after cancellation")
		}
	})
	return cancel, done
}

// hsClient speaks the handshake byte by byte.
type hsClient struct {
	conn net.Conn
	br   *bufio.Reader
}

// dialGreeting connects and checks the server's greeting, without sending
// client flags.
func dialGreeting(t testing.TB, path string) *hsClient {
	t.Helper()
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	c := &hsClient{conn: conn, br: bufio.NewReader(conn)}
	var g [18]byte
	if _, err := io.ReadFull(c.br, g[:]); err != nil {
		t.Fatalf("reading greeting: %v", err)
	}
	if binary.BigEndian.Uint64(g[0:8]) != magicNBD || binary.BigEndian.Uint64(g[8:16]) != magicIHaveOpt {
		t.Fatalf("bad greeting %x", g)
	}
	if f := binary.BigEndian.Uint16(g[16:18]); f != flagFixedNewstyle|flagNoZeroes {
		t.Fatalf("handshake flags %#x", f)
	}
	return c
}

// dial connects and sends client flags.
func dial(t testing.TB, path string, clientFlags uint32) *hsClient {
	t.Helper()
	c := dialGreeting(t, path)
	c.write(t, binary.BigEndian.AppendUint32(nil, clientFlags))
	return c
}

func (c *hsClient) write(t testing.TB, b []byte) {
	t.Helper()
	if _, err := c.conn.Write(b); err != nil {
		t.Fatalf("write: %v", err)
	}
}

func optionBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func (c *hsClient) option(t testing.TB, opt uint32, data []byte) {
	t.Helper()
	c.write(t, optionBytes(opt, data))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *hsClient) reply(t testing.TB) optReply {
	t.Helper()
	var h [20]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		t.Fatalf("reading option reply: %v", err)
	}
	if m := binary.BigEndian.Uint64(h[0:8]); m != magicOptionReply {
		t.Fatalf("option reply magic %#x", m)
	}
	r := optReply{opt: binary.BigEndian.Uint32(h[8:12]), typ: binary.BigEndian.Uint32(h[12:16])}
	r.data = make([]byte, binary.BigEndian.Uint32(h[16:20]))
	if _, err := io.ReadFull(c.br, r.data); err != nil {
		t.Fatalf("reading option reply data: %v", err)
	}
	return r
}

func (c *hsClient) expectReply(t testing.TB, opt, typ uint32) optReply {
	t.Helper()
	r := c.reply(t)
	if r.opt != opt || r.typ != typ {
		t.Fatalf("reply to option %d: got option %d type %#x (%q), want type %#x", opt, r.opt, r.typ, r.data, typ)
	}
	return r
}

func (c *hsClient) expectClosed(t testing.TB) {
	t.Helper()
	_ = c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	// A peer that closes with our bytes unread makes the kernel report
	// ECONNRESET instead of EOF; both mean the server closed.
	if b, err := io.ReadAll(c.br); (err != nil && !errors.Is(err, syscall.ECONNRESET)) || len(b) != 0 {
		t.Fatalf("expected the server to close the connection, got %d bytes, err %v", len(b), err)
	}
}

func infoData(name string, requests ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(requests)))
	for _, r := range requests {
		b = binary.BigEndian.AppendUint16(b, r)
	}
	return b
}

// exportInfo is what INFO/GO told us.
type exportInfo struct {
	size                  uint64
	flags                 uint16
	name, description     string
	minBS, prefBS, maxBS  uint32
	haveName, haveBlockSz bool
}

// infoReplies reads INFO replies up to the ACK.
func (c *hsClient) infoReplies(t testing.TB, opt uint32) exportInfo {
	t.Helper()
	var e exportInfo
	haveExport := false
	for {
		r := c.reply(t)
		if r.opt != opt {
			t.Fatalf("reply for option %d, want %d", r.opt, opt)
		}
		if r.typ == repAck {
			break
		}
		if r.typ != repInfo {
			t.Fatalf("option %d: reply type %#x (%q)", opt, r.typ, r.data)
		}
		switch binary.BigEndian.Uint16(r.data) {
		case infoExport:
			if len(r.data) != 12 {
				t.Fatalf("INFO_EXPORT length %d", len(r.data))
			}
			e.size, e.flags, haveExport = binary.BigEndian.Uint64(r.data[2:]), binary.BigEndian.Uint16(r.data[10:]), true
		case infoName:
			e.name, e.haveName = string(r.data[2:]), true
		case infoDescription:
			e.description = string(r.data[2:])
		case infoBlockSize:
			if len(r.data) != 14 {
				t.Fatalf("INFO_BLOCK_SIZE length %d", len(r.data))
			}
			e.minBS, e.prefBS, e.maxBS = binary.BigEndian.Uint32(r.data[2:]), binary.BigEndian.Uint32(r.data[6:]), binary.BigEndian.Uint32(r.data[10:])
			e.haveBlockSz = true
		}
	}
	if !haveExport {
		t.Fatalf("option %d: no INFO_EXPORT before ACK", opt)
	}
	return e
}

// goTransmission sends GO for name and returns a transmission-phase client.
func (c *hsClient) goTransmission(t testing.TB, name string) (*rawClient, exportInfo) {
	t.Helper()
	c.option(t, optGo, infoData(name, infoName, infoBlockSize))
	e := c.infoReplies(t, optGo)
	_ = c.conn.SetDeadline(time.Time{})
	return &rawClient{conn: c.conn, br: c.br}, e
}

func twoExports() []Export {
	return []Export{
		{Name: "alpha", Description: "first disk", Device: &memDevice{data: randomBytes(3<<20+512, 21)}},
		{Name: "beta", Device: &memDevice{data: randomBytes(1<<20, 22)}, BlockSize: 512},
	}
}

func TestServerListInfoGo(t *testing.T) {
	exports := twoExports()
	path, _, _ := startServer(t, &Server{Exports: exports})
	c := dial(t, path, clientFixedNewstyle|clientNoZeroes)

	c.option(t, optList, nil)
	for _, e := range exports {
		r := c.expectReply(t, optList, repServer)
		n := binary.BigEndian.Uint32(r.data)
		if got := string(r.data[4 : 4+n]); got != e.Name {
			t.Fatalf("LIST name %q, want %q", got, e.Name)
		}
		if got := string(r.data[4+n:]); got != e.Description {
			t.Fatalf("LIST description %q, want %q", got, e.Description)
		}
	}
	c.expectReply(t, optList, repAck)

	c.option(t, optInfo, infoData("beta", infoName, infoDescription, infoBlockSize, 77))
	info := c.infoReplies(t, optInfo)
	if info.size != 1<<20 || info.flags != FlagHasFlags|FlagReadOnly|FlagSendFlush|FlagCanMultiConn {
		t.Fatalf("INFO beta: size %d flags %#x", info.size, info.flags)
	}
	if info.name != "beta" || info.minBS != 1 || info.prefBS != 512 || info.maxBS != MaxRequestSize {
		t.Fatalf("INFO beta: %+v", info)
	}

	c.option(t, optInfo, infoData("gamma"))
	c.expectReply(t, optInfo, repErrUnknown)
	c.option(t, optGo, infoData("gamma"))
	c.expectReply(t, optGo, repErrUnknown)

	// The empty name is the default export, the first; INFO_NAME tells the
	// client its real name.
	tc, info := c.goTransmission(t, "")
	if info.name != "alpha" || info.size != uint64(len(exports[0].Device.(*memDevice).data)) || info.prefBS != 4096 {
		t.Fatalf("GO default: %+v", info)
	}
	data := exports[0].Device.(*memDevice).data
	checkBytes(t, tc.read(t, 1, 3<<20, 512), data[3<<20:], "read after GO")
	tc.send(t, 0, cmdDisc, 0, 0, 0, nil)
	tc.expectEOF(t)
}

func TestServerExportName(t *testing.T) {
	exports := twoExports()
	path, _, _ := startServer(t, &Server{Exports: exports})
	for _, noZeroes := range []bool{false, true} {
		flags := clientFixedNewstyle
		if noZeroes {
			flags |= clientNoZeroes
		}
		c := dial(t, path, flags)
		c.option(t, optExportName, []byte("beta"))
		reply := make([]byte, 10)
		if !noZeroes {
			reply = make([]byte, 10+exportZeroPadding)
		}
		if _, err := io.ReadFull(c.br, reply); err != nil {
			t.Fatal(err)
		}
		if binary.BigEndian.Uint64(reply) != 1<<20 || binary.BigEndian.Uint16(reply[8:]) != ReadOnlyFlags || !bytes.Equal(reply[10:], make([]byte, len(reply)-10)) {
			t.Fatalf("EXPORT_NAME reply %x", reply)
		}
		tc := &rawClient{conn: c.conn, br: c.br}
		data := exports[1].Device.(*memDevice).data
		checkBytes(t, tc.read(t, 9, 4096, 4096), data[4096:8192], "read after EXPORT_NAME")
	}
	// Unknown name: no reply is possible, the connection closes.
	c := dial(t, path, clientFixedNewstyle)
	c.option(t, optExportName, []byte("nope"))
	c.expectClosed(t)
}

// TestServerHandshakeAbuse: each hostile or broken client loses only its own
// connection, and the server keeps serving others.
func TestServerHandshakeAbuse(t *testing.T) {
	exports := twoExports()
	path, _, _ := startServer(t, &Server{Exports: exports, HandshakeTimeout: 500 * time.Millisecond})

	stillServes := func(t *testing.T) {
		t.Helper()
		c := dial(t, path, clientFixedNewstyle|clientNoZeroes)
		tc, _ := c.goTransmission(t, "beta")
		checkBytes(t, tc.read(t, 1, 0, 100), exports[1].Device.(*memDevice).data[:100], "read on a fresh connection")
	}

	t.Run("unknown client flags", func(t *testing.T) {
		c := dial(t, path, 1<<7)
		c.expectClosed(t)
	})
	t.Run("bad option magic", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		c.write(t, []byte("GET / HTTP/1.0\r\n\r\nxxxxxxxxxxx"))
		c.expectClosed(t)
	})
	t.Run("unsupported options keep the session", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		for _, opt := range []uint32{optStartTLS, optStructuredReply, optListMetaContext, optSetMetaContext, optExtendedHeaders, 4, 12345} {
			c.option(t, opt, []byte("some option data the server must skip"))
			c.expectReply(t, opt, repErrUnsup)
		}
		c.option(t, optList, []byte("x"))
		c.expectReply(t, optList, repErrInvalid)
		c.option(t, optList, nil)
		c.expectReply(t, optList, repServer)
		c.expectReply(t, optList, repServer)
		c.expectReply(t, optList, repAck)
		tc, _ := c.goTransmission(t, "alpha")
		tc.read(t, 5, 0, 512)
	})
	t.Run("malformed INFO", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		c.option(t, optInfo, []byte{0, 0})
		c.expectReply(t, optInfo, repErrInvalid)
		bad := infoData("alpha", infoName)
		binary.BigEndian.PutUint32(bad, 1000) // name length beyond the option
		c.option(t, optInfo, bad)
		c.expectReply(t, optInfo, repErrInvalid)
		bad = infoData("alpha", infoName)
		binary.BigEndian.PutUint16(bad[len(bad)-4:], 3) // request count beyond the option
		c.option(t, optGo, bad)
		c.expectReply(t, optGo, repErrInvalid)
		long := infoData(string(bytes.Repeat([]byte("n"), maxNameLength+1)))
		c.option(t, optGo, long)
		c.expectReply(t, optGo, repErrTooBig)
		tc, _ := c.goTransmission(t, "alpha")
		tc.read(t, 5, 0, 512)
	})
	t.Run("oversized EXPORT_NAME closes", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		c.option(t, optExportName, bytes.Repeat([]byte("n"), maxNameLength+1))
		c.expectClosed(t)
	})
	t.Run("huge option length closes without reading it", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		hdr := optionBytes(12345, nil)
		binary.BigEndian.PutUint32(hdr[12:], 1<<30)
		c.write(t, hdr)
		c.expectClosed(t)
	})
	t.Run("option flood", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		var flood []byte
		for range maxOptions + 50 {
			flood = append(flood, optionBytes(12345, nil)...)
		}
		go func() { _, _ = c.conn.Write(flood) }() // the server stops reading midway
		for range maxOptions {
			c.expectReply(t, 12345, repErrUnsup)
		}
		c.expectClosed(t)
	})
	t.Run("abort", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		c.option(t, optAbort, []byte("tolerated data"))
		c.expectReply(t, optAbort, repAck)
		c.expectClosed(t)
	})
	t.Run("stalled client times out", func(t *testing.T) {
		start := time.Now()
		c := dialGreeting(t, path) // never sends its flags
		stillServes(t)             // others are unaffected meanwhile
		c.expectClosed(t)
		if d := time.Since(start); d > 5*time.Second {
			t.Fatalf("stalled handshake closed after %v, timeout is 500ms", d)
		}
	})
	t.Run("half-closed during handshake", func(t *testing.T) {
		c := dial(t, path, clientFixedNewstyle)
		c.write(t, optionBytes(optList, nil)[:10])
		_ = c.conn.(*net.UnixConn).CloseWrite()
		c.expectClosed(t)
	})
	stillServes(t)
}

// TestServerConcurrentClients: 32 clients at once, each reading its own part
// of a real file through os.File, each checking its bytes.
func TestServerConcurrentClients(t *testing.T) {
	const clients, perClient = 32, 64 << 10
	want := randomBytes(clients*perClient*4, 23)
	file := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(file, want, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	dev := io.NewSectionReader(f, 0, int64(len(want)))
	path, _, _ := startServer(t, &Server{Exports: []Export{{Name: "disk", Device: dev}}})

	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for i := range clients {
		wg.Go(func() {
			if err := readRegion(path, want, i*len(want)/clients, len(want)/clients); err != nil {
				errs <- fmt.Errorf("client %d: %w", i, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// readRegion is a minimal goroutine-safe client (no testing.T calls): it
// negotiates, pipelines 16 KiB reads over [off, off+n) and compares them.
func readRegion(path string, want []byte, off, n int) error {
	conn, err := net.Dial("unix", path)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	br := bufio.NewReader(conn)
	if _, err := io.ReadFull(br, make([]byte, 18)); err != nil {
		return err
	}
	msg := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	msg = append(msg, optionBytes(optGo, infoData("disk"))...)
	if _, err := conn.Write(msg); err != nil {
		return err
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return err
		}
		if _, err := br.Discard(int(binary.BigEndian.Uint32(h[16:]))); err != nil {
			return err
		}
		if typ := binary.BigEndian.Uint32(h[12:16]); typ == repAck {
			break
		} else if typ != repInfo {
			return fmt.Errorf("GO reply type %#x", typ)
		}
	}
	const chunk = 16 << 10
	var reqs []byte
	for o := off; o < off+n; o += chunk {
		reqs = encodeRequest(reqs, 0, cmdRead, uint64(o), uint64(o), chunk)
	}
	go func() { _, _ = conn.Write(reqs) }()
	got := make([]byte, chunk)
	for range n / chunk {
		var h [replyHeaderSize]byte
		if _, err := io.ReadFull(br, h[:]); err != nil {
			return err
		}
		if e := binary.BigEndian.Uint32(h[4:]); e != 0 {
			return fmt.Errorf("errno %d", e)
		}
		o := int(binary.BigEndian.Uint64(h[8:]))
		if _, err := io.ReadFull(br, got); err != nil {
			return err
		}
		if o < off || o+chunk > off+n || !bytes.Equal(got, want[o:o+chunk]) {
			return fmt.Errorf("wrong data for cookie/offset %d", o)
		}
	}
	_, err = conn.Write(encodeRequest(nil, 0, cmdDisc, 0, 0, 0))
	return err
}

// TestServerShutdownDrains cancels the server while reads are stuck in the
// device: they are answered, then the connection closes and Serve returns nil
// and closes the listener.
func TestServerShutdownDrains(t *testing.T) {
	dev := &gatedDevice{memDevice: memDevice{data: randomBytes(1<<16, 24)}, gate: make(chan struct{})}
	path, cancel, served := startServer(t, &Server{Exports: []Export{{Name: "g", Device: dev}}})
	c := dial(t, path, clientFixedNewstyle|clientNoZeroes)
	tc, _ := c.goTransmission(t, "g")
	for i := range 5 {
		tc.send(t, 0, cmdRead, uint64(i), uint64(i*512), 512, nil)
	}
	// Cancel only once the server has read all five (each is in the device):
	// requests still unread at cancellation are never answered.
	waitFor(t, "reads in the device", func() bool { return dev.started.Load() == 5 })
	// A client still negotiating is cut off.
	pending := dial(t, path, clientFixedNewstyle)
	cancel()
	pending.expectClosed(t)
	time.Sleep(20 * time.Millisecond)
	select {
	case err := <-served:
		t.Fatalf("Serve returned %v with replies still owed", err)
	default:
	}
	close(dev.gate)
	for range 5 {
		errno, cookie := tc.reply(t)
		if errno != 0 || cookie >= 5 {
			t.Fatalf("reply errno %d cookie %d", errno, cookie)
		}
		tc.data(t, 512)
	}
	tc.expectEOF(t)
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("Serve returned %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
	if _, err := net.Dial("unix", path); err == nil {
		t.Fatal("listener still accepts after shutdown")
	}
}

func TestServerRejectsBadExports(t *testing.T) {
	dev := &memDevice{data: make([]byte, 512)}
	for name, exports := range map[string][]Export{
		"none":             nil,
		"nil device":       {{Name: "a"}},
		"duplicate name":   {{Name: "a", Device: dev}, {Name: "a", Device: dev}},
		"long name":        {{Name: string(make([]byte, maxNameLength+1)), Device: dev}},
		"odd block size":   {{Name: "a", Device: dev, BlockSize: 1000}},
		"small block size": {{Name: "a", Device: dev, BlockSize: 256}},
	} {
		l, err := net.Listen("unix", filepath.Join(t.TempDir(), "s"))
		if err != nil {
			t.Fatal(err)
		}
		if err := (&Server{Exports: exports}).Serve(context.Background(), l); err == nil {
			t.Errorf("%s: Serve accepted bad exports", name)
		}
	}
}

func TestServerMaxConnections(t *testing.T) {
	path, _, _ := startServer(t, &Server{Exports: twoExports(), MaxConnections: 2})
	a := dial(t, path, clientFixedNewstyle)
	b := dial(t, path, clientFixedNewstyle)
	// Both are accepted and negotiating; a third is closed straight away.
	a.option(t, optList, nil)
	a.expectReply(t, optList, repServer)
	b.option(t, optList, nil)
	b.expectReply(t, optList, repServer)
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(conn); err != nil || len(b) != 0 {
		t.Fatalf("third connection: %d bytes, err %v", len(b), err)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal("third connection was not closed")
	}
}

// TestServerSharedBufferBudget: several clients that take no replies are
// held together to the server-wide buffer budget.
func TestServerSharedBufferBudget(t *testing.T) {
	const clients, perClient, size, budget = 3, 40, 1 << 20, 4 << 20
	dev := &countingDevice{memDevice: memDevice{data: randomBytes(8<<20, 25)}}
	path, _, _ := startServer(t, &Server{
		Exports:          []Export{{Name: "c", Device: dev}},
		MaxBufferedBytes: budget,
		Transmission:     TransmissionOptions{MaxRequestSize: size, Handlers: 64},
	})
	var conns []*rawClient
	for range clients {
		tc, _ := dial(t, path, clientFixedNewstyle|clientNoZeroes).goTransmission(t, "c")
		var msg []byte
		for i := range perClient {
			msg = encodeRequest(msg, 0, cmdRead, uint64(i), uint64(i%8)*size, size)
		}
		if _, err := tc.conn.Write(msg); err != nil {
			t.Fatal(err)
		}
		conns = append(conns, tc)
	}
	last := waitForStall(&dev.reads)
	held := last
	for _, tc := range conns {
		held -= int64(queuedReplies(t, tc.conn, size))
	}
	t.Logf("%d reads served, %d held by the server", last, held)
	if held > budget/size+clients {
		t.Fatalf("server holds %d replies of 1 MiB for %d stalled clients; its budget is 4 MiB", held, clients)
	}
	// Now every client reads; each gets all its replies.
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	for _, tc := range conns {
		wg.Go(func() {
			got := make([]byte, size)
			for range perClient {
				var h [replyHeaderSize]byte
				if _, err := io.ReadFull(tc.br, h[:]); err != nil {
					errs <- err
					return
				}
				if _, err := io.ReadFull(tc.br, got); err != nil {
					errs <- err
					return
				}
				off := (binary.BigEndian.Uint64(h[8:]) % 8) * size
				if e := binary.BigEndian.Uint32(h[4:]); e != 0 || !bytes.Equal(got, dev.data[off:off+size]) {
					errs <- fmt.Errorf("reply errno %d or wrong data", e)
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestServerStalledReaderDropped: a client that asks for reads and never
// takes the replies holds the whole shared budget until the write timeout
// drops it; then another client is served.
func TestServerStalledReaderDropped(t *testing.T) {
	const size = 1 << 20
	dev := &memDevice{data: randomBytes(8<<20, 26)}
	path, _, _ := startServer(t, &Server{
		Exports:          []Export{{Name: "s", Device: dev}},
		MaxBufferedBytes: 2 * size,
		Transmission:     TransmissionOptions{MaxRequestSize: size, WriteTimeout: 500 * time.Millisecond},
	})
	stalled, _ := dial(t, path, clientFixedNewstyle|clientNoZeroes).goTransmission(t, "s")
	var msg []byte
	for i := range 64 {
		msg = encodeRequest(msg, 0, cmdRead, uint64(i), uint64(i%8)*size, size)
	}
	if _, err := stalled.conn.Write(msg); err != nil {
		t.Fatal(err)
	}
	// Wait until the stall is established: replies stop arriving.
	for last := -1; ; {
		time.Sleep(200 * time.Millisecond)
		q := queuedReplies(t, stalled.conn, size)
		if q == last {
			break
		}
		last = q
	}
	// The server holds the whole shared budget for the stalled client; the
	// write timeout must free it for the next client.
	start := time.Now()
	good, _ := dial(t, path, clientFixedNewstyle|clientNoZeroes).goTransmission(t, "s")
	checkBytes(t, good.read(t, 1, 0, size), dev.data[:size], "read after another client stalled")
	t.Logf("served %v after the stall was seen", time.Since(start))
	// The stalled client's connection was closed: after the replies the
	// kernel had buffered, it reads EOF (or a reset), not our deadline.
	_ = stalled.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, stalled.br)
	if err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("stalled client: %v after %d bytes", err, n)
	}
	if n >= 64*size {
		t.Fatalf("stalled client received all %d bytes: it was never stalled", n)
	}
}
