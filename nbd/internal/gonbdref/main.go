// Command gonbdref serves one file read-only with go-nbd's server
// (github.com/pojntfx/go-nbd/pkg/server.Handle), as a reference point for
// scripts/bench-nbd.sh. It is not part of rafsnbd: go-nbd's loop is serial
// (one request at a time per connection), which is what the benchmark shows.
//
//	gonbdref -socket /tmp/ref.sock -file disk.img
//
// The export has the empty name, so nbd+unix:///?socket=/tmp/ref.sock
// reaches it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"github.com/pojntfx/go-nbd/pkg/backend"
	"github.com/pojntfx/go-nbd/pkg/server"
)

func main() {
	socket := flag.String("socket", "", "unix socket `PATH` to listen on")
	file := flag.String("file", "", "`FILE` to serve read-only")
	flag.Parse()
	if err := run(*socket, *file); err != nil {
		fmt.Fprintf(os.Stderr, "gonbdref: %v\n", err)
		os.Exit(1)
	}
}

func run(socket, file string) error {
	if socket == "" || file == "" {
		return errors.New("need -socket and -file")
	}
	f, err := os.Open(file)
	if err != nil {
		return err
	}
	defer f.Close()
	exports := []*server.Export{{Name: "", Backend: backend.NewFileBackend(f)}}
	options := &server.Options{ReadOnly: true, SupportsMultiConn: true, PreferredBlockSize: 4096}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	l, err := net.Listen("unix", socket)
	if err != nil {
		return err
	}
	context.AfterFunc(ctx, func() { _ = l.Close() })
	var conns sync.WaitGroup
	defer conns.Wait()
	for {
		conn, err := l.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		conns.Go(func() {
			defer conn.Close()
			// Handle has no cancellation; closing the socket ends it.
			defer context.AfterFunc(ctx, func() { _ = conn.Close() })()
			// Its errors (including a client's plain disconnect) are not
			// interesting to the benchmark.
			_ = server.Handle(conn, exports, options)
		})
	}
}
