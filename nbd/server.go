package nbd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"

	"github.com/rs/zerolog"
)

// Server serves read-only exports to NBD network clients (qemu, nbdinfo,
// nbdcopy, nbdfuse, nbd-client) over fixed-newstyle negotiation followed by
// the same transmission engine the kernel path uses.
type Server struct {
	// Exports are offered by name; the first is the default export.
	Exports []Export
	// Logger receives connection and device diagnostics; nil is silent.
	Logger *zerolog.Logger
	// HandshakeTimeout bounds the whole negotiation of one connection, so a
	// client that stalls costs only its own connection. 0 means 10 s.
	HandshakeTimeout time.Duration
	// MaxConnections bounds concurrent connections; further ones are closed
	// at once. 0 means 1024.
	MaxConnections int
	// MaxBufferedBytes bounds the data buffers all connections hold at once,
	// on top of each connection's Transmission.MaxBufferedBytes, so that
	// many clients that do not take their replies cannot exhaust memory;
	// Transmission.WriteTimeout (60 s by default here) drops such clients
	// and frees what they held. 0 means 512 MiB; it is raised to at least
	// one largest request.
	MaxBufferedBytes int64
	// Transmission tunes every connection's engine. Its Logger is replaced
	// by a per-connection child of Logger.
	Transmission TransmissionOptions
}

// Serve accepts connections on l until ctx is cancelled, then stops
// accepting, lets every connection drain its in-flight replies (for at most
// Transmission.DrainTimeout, after which device reads still running are
// cancelled or left behind), and returns nil. It closes l. Any other accept failure that cannot be retried is
// returned after the connections have finished.
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	defer l.Close()
	if err := validateExports(s.Exports); err != nil {
		return err
	}
	log := zerolog.Nop()
	if s.Logger != nil {
		log = *s.Logger
	}
	handshakeTimeout := s.HandshakeTimeout
	if handshakeTimeout <= 0 {
		handshakeTimeout = 10 * time.Second
	}
	maxConns := s.MaxConnections
	if maxConns <= 0 {
		maxConns = 1024
	}
	opts := s.Transmission
	opts.buffers = new(bufferPool) // shared by all connections
	switch {
	case opts.WriteTimeout == 0:
		opts.WriteTimeout = 60 * time.Second
	case opts.WriteTimeout < 0:
		opts.WriteTimeout = 0
	}
	opts.MaxRequestSize = opts.maxRequestSize()
	shared := s.MaxBufferedBytes
	if shared <= 0 {
		shared = 512 << 20
	}
	opts.shared = newByteBudget(budgetFloor(shared, opts.MaxRequestSize))

	stopClosing := context.AfterFunc(ctx, func() { _ = l.Close() })
	defer stopClosing()

	var conns sync.WaitGroup
	defer conns.Wait()
	slots := make(chan struct{}, maxConns)
	var backoff time.Duration
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return fmt.Errorf("nbd: listener closed: %w", err)
			}
			// EMFILE, ECONNABORTED and the like pass; back off and retry.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			log.Warn().Err(err).Dur("retry_in", backoff).Msg("nbd: accept failed")
			select {
			case <-time.After(backoff):
				continue
			case <-ctx.Done():
				return nil
			}
		}
		backoff = 0
		select {
		case slots <- struct{}{}:
		default:
			log.Warn().Str("remote", conn.RemoteAddr().String()).Int("limit", maxConns).Msg("nbd: too many connections; closing new one")
			_ = conn.Close()
			continue
		}
		conns.Go(func() {
			defer func() { <-slots }()
			s.serveConn(ctx, conn, log, handshakeTimeout, opts)
		})
	}
}

func (s *Server) serveConn(ctx context.Context, conn net.Conn, log zerolog.Logger, handshakeTimeout time.Duration, opts TransmissionOptions) {
	clog := log.With().Str("remote", remoteName(conn)).Logger()
	// A cancelled server breaks off negotiations at once; the engine has its
	// own, draining, reaction to cancellation.
	stopHandshake := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	_ = conn.SetDeadline(time.Now().Add(handshakeTimeout))
	in := bufio.NewReaderSize(conn, readBufferSize)
	exp, err := negotiate(conn, in, s.Exports, opts.MaxRequestSize)
	if !stopHandshake() || err != nil {
		_ = conn.Close()
		switch {
		case errors.Is(err, errAborted):
			clog.Debug().Msg("nbd: client ended the handshake")
		case err != nil:
			clog.Debug().Err(err).Msg("nbd: handshake failed")
		}
		return
	}
	_ = conn.SetDeadline(time.Time{})
	clog = clog.With().Str("export", exp.Name).Logger()
	clog.Debug().Msg("nbd: client connected")
	opts.Logger = &clog
	err = serveTransmission(ctx, conn, in, exp.Device, opts)
	switch {
	case err == nil:
		clog.Debug().Msg("nbd: client disconnected")
	case errors.Is(err, io.EOF):
		clog.Debug().Err(err).Msg("nbd: client went away")
	default:
		clog.Info().Err(err).Msg("nbd: connection ended")
	}
}

func remoteName(conn net.Conn) string {
	if a := conn.RemoteAddr(); a != nil && a.String() != "" {
		return a.String()
	}
	return "unix"
}

func validateExports(exports []Export) error {
	if len(exports) == 0 {
		return errors.New("nbd: no exports")
	}
	seen := make(map[string]bool, len(exports))
	for i := range exports {
		if err := exports[i].validate(); err != nil {
			return err
		}
		if seen[exports[i].Name] {
			return fmt.Errorf("nbd: export name %q used twice", exports[i].Name)
		}
		seen[exports[i].Name] = true
	}
	return nil
}
