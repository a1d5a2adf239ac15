"""What the OpenTelemetry libraries cost per call here: W3C extract+inject with the API, and an
SDK span (start, end) with a batch processor to an in-memory exporter and to an OTLP/HTTP
exporter posting to a local sink, CPU of the export thread included. `python benchmarks/otel_costs.py`"""
import time
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
import threading, http.server

class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["content-length"])); self.send_response(200); self.end_headers()
    def log_message(self, *a): pass
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H); threading.Thread(target=srv.serve_forever, daemon=True).start()
N = 20000
def bench(name, fn, n=N):
    t = time.process_time(); 
    for _ in range(n): fn()
    return (time.process_time() - t) / n * 1e6
prop = TraceContextTextMapPropagator()
carrier = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
print("api extract+inject (W3C)", round(bench("x", lambda: prop.inject({}, context=prop.extract(carrier))), 1))
for label, proc in (("sdk span, batch → in-memory", BatchSpanProcessor(InMemorySpanExporter())),
                    ("sdk span, batch → OTLP/HTTP", BatchSpanProcessor(OTLPSpanExporter(endpoint=f"http://127.0.0.1:{srv.server_port}/v1/traces")))):
    tp = TracerProvider(); tp.add_span_processor(proc); tr = tp.get_tracer("m")
    def span():
        s = tr.start_span("GET", kind=SpanKind.CLIENT, attributes={"http.request.method": "GET", "url.path": "/x", "http.response.status_code": 200})
        s.end()
    t0 = time.process_time(); w0 = time.time()
    for _ in range(N): span()
    tp.force_flush(); tp.shutdown()
    print(label, "(incl. export thread CPU)", round((time.process_time() - t0) / N * 1e6, 1))
