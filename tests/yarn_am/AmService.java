// Hadoop's own ApplicationMasterProtocol server, for poolgate's tests (tests/yarn_am_service.py).
//
// Usage: java AmService [authentication|integrity|privacy]   (hadoop.rpc.protection)
//
// Runs org.apache.hadoop.ipc.Server through YarnRPC (HadoopYarnProtoRPC, ProtobufRpcEngine2)
// with TOKEN authentication only, as the ResourceManager's ApplicationMasterService does, and a
// secret manager for AMRMTokenIdentifier. Mints AMRMTokens and writes them with Hadoop's own
// Credentials class. Talks over stdin/stdout, one line each:
//   stdin:  MINT <attempt> <path> <writable|protobuf> [bad]   (bad: a password from another key)
//           SHUTDOWN <attempt> | RESYNC <attempt>              (the next allocate's AM command)
//           REVOKE <attempt>                                   (its token is refused from now)
//           FORGET <attempt>                                   (its registration is lost)
//           STATS       (the server's own counts of SASL authentications that failed/succeeded)
//   stdout: JSON objects: {"event": "ready", "port": N}, {"event": "ok", "cmd": ...},
//           {"event": "register"|"allocate"|"finish"|"refused"|"error", "attempt": ..., ...}
import java.io.BufferedReader;
import java.io.DataOutputStream;
import java.io.FileOutputStream;
import java.io.IOException;
import java.io.InputStreamReader;
import java.net.InetSocketAddress;
import java.nio.charset.StandardCharsets;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;
import javax.crypto.SecretKey;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.io.Text;
import org.apache.hadoop.ipc.Server;
import org.apache.hadoop.security.Credentials;
import org.apache.hadoop.security.UserGroupInformation;
import org.apache.hadoop.security.token.SecretManager;
import org.apache.hadoop.security.token.Token;
import org.apache.hadoop.yarn.api.ApplicationMasterProtocol;
import org.apache.hadoop.yarn.api.protocolrecords.AllocateRequest;
import org.apache.hadoop.yarn.api.protocolrecords.AllocateResponse;
import org.apache.hadoop.yarn.api.protocolrecords.FinishApplicationMasterRequest;
import org.apache.hadoop.yarn.api.protocolrecords.FinishApplicationMasterResponse;
import org.apache.hadoop.yarn.api.protocolrecords.RegisterApplicationMasterRequest;
import org.apache.hadoop.yarn.api.protocolrecords.RegisterApplicationMasterResponse;
import org.apache.hadoop.yarn.api.records.AMCommand;
import org.apache.hadoop.yarn.api.records.ApplicationAttemptId;
import org.apache.hadoop.yarn.api.records.Resource;
import org.apache.hadoop.yarn.exceptions.ApplicationMasterNotRegisteredException;
import org.apache.hadoop.yarn.exceptions.InvalidApplicationMasterRequestException;
import org.apache.hadoop.yarn.exceptions.YarnException;
import org.apache.hadoop.yarn.ipc.YarnRPC;
import org.apache.hadoop.yarn.security.AMRMTokenIdentifier;
import org.apache.hadoop.yarn.util.Records;

public class AmService {
  static synchronized void say(String event, String attempt, String... kv) {
    StringBuilder b = new StringBuilder("{\"event\": ").append(q(event));
    if (attempt != null) b.append(", \"attempt\": ").append(q(attempt));
    for (int i = 0; i + 1 < kv.length; i += 2) b.append(", ").append(q(kv[i])).append(": ").append(q(kv[i + 1]));
    System.out.println(b.append("}"));
    System.out.flush();
  }

  static String q(String s) {
    if (s == null) return "null";
    StringBuilder b = new StringBuilder("\"");
    for (char c : s.toCharArray()) {
      if (c == '"' || c == '\\') b.append('\\').append(c);
      else if (c < 0x20) b.append(String.format("\\u%04x", (int) c));
      else b.append(c);
    }
    return b.append('"').toString();
  }

  /** AMRMTokens of known attempts: one key, as the RM's AMRMTokenSecretManager has a master key. */
  static class Secrets extends SecretManager<AMRMTokenIdentifier> {
    final SecretKey key = generateSecret();
    final SecretKey other = generateSecret();
    final Map<String, Boolean> known = new ConcurrentHashMap<>();

    @Override protected byte[] createPassword(AMRMTokenIdentifier id) {
      return createPassword(id.getBytes(), key);
    }

    byte[] forgedPassword(AMRMTokenIdentifier id) {
      return createPassword(id.getBytes(), other);
    }

    @Override public byte[] retrievePassword(AMRMTokenIdentifier id) throws InvalidToken {
      String attempt = String.valueOf(id.getApplicationAttemptId());
      if (!known.containsKey(attempt)) {
        say("refused", attempt, "reason", "unknown application attempt");
        throw new InvalidToken("Application attempt " + attempt + " is not known to this RM");
      }
      return createPassword(id.getBytes(), key);
    }

    @Override public AMRMTokenIdentifier createIdentifier() {
      return new AMRMTokenIdentifier();
    }
  }

  /** What the RM's ApplicationMasterService checks, kept per attempt. */
  static class Attempt {
    boolean registered;
    int responseId;
    AMCommand next;
  }

  static final Map<String, Attempt> attempts = new ConcurrentHashMap<>();

  static String caller() throws IOException {
    return UserGroupInformation.getCurrentUser().getUserName();  // the token's attempt id
  }

  static class Service implements ApplicationMasterProtocol {
    @Override public RegisterApplicationMasterResponse registerApplicationMaster(
        RegisterApplicationMasterRequest req) throws YarnException, IOException {
      String a = caller();
      Attempt s = attempts.computeIfAbsent(a, k -> new Attempt());
      synchronized (s) {
        if (s.registered) {
          say("error", a, "call", "register", "reason", "already registered");
          throw new InvalidApplicationMasterRequestException(
              "Application Master is already registered : " + a);
        }
        s.registered = true;
        s.responseId = 0;
      }
      say("register", a, "host", req.getHost(), "rpc_port", String.valueOf(req.getRpcPort()),
          "tracking_url", req.getTrackingUrl());
      RegisterApplicationMasterResponse resp = Records.newRecord(RegisterApplicationMasterResponse.class);
      resp.setMaximumResourceCapability(Resource.newInstance(8192, 4));
      resp.setQueue("default");
      return resp;
    }

    @Override public AllocateResponse allocate(AllocateRequest req) throws YarnException, IOException {
      String a = caller();
      Attempt s = attempts.get(a);
      AMCommand cmd;
      int id;
      synchronized (s == null ? AmService.class : s) {
        if (s == null || !s.registered) {
          say("error", a, "call", "allocate", "reason", "not registered");
          throw new ApplicationMasterNotRegisteredException(
              "AM is not registered for known application attempt: " + a
              + " or RM had restarted after AM registered. AM should re-register.");
        }
        if (req.getResponseId() != s.responseId) {
          say("error", a, "call", "allocate", "reason", "responseId " + req.getResponseId());
          throw new InvalidApplicationMasterRequestException("Invalid responseId in AllocateRequest "
              + "from application attempt: " + a + ", expect responseId to be " + s.responseId
              + ", but get " + req.getResponseId());
        }
        cmd = s.next;
        s.next = null;
        if (cmd == AMCommand.AM_RESYNC) s.registered = false;
        id = ++s.responseId;
      }
      say("allocate", a, "response_id", String.valueOf(req.getResponseId()),
          "progress", String.valueOf(req.getProgress()), "command", String.valueOf(cmd));
      AllocateResponse resp = Records.newRecord(AllocateResponse.class);
      resp.setResponseId(id);
      resp.setNumClusterNodes(1);
      resp.setAvailableResources(Resource.newInstance(8192, 4));
      if (cmd != null) resp.setAMCommand(cmd);
      return resp;
    }

    @Override public FinishApplicationMasterResponse finishApplicationMaster(
        FinishApplicationMasterRequest req) throws YarnException, IOException {
      String a = caller();
      Attempt s = attempts.get(a);
      if (s == null || !s.registered) {
        say("error", a, "call", "finish", "reason", "not registered");
        throw new ApplicationMasterNotRegisteredException(
            "Application Master is trying to unregister before registering for: " + a);
      }
      say("finish", a, "final_status", String.valueOf(req.getFinalApplicationStatus()),
          "diagnostics", req.getDiagnostics(), "tracking_url", req.getTrackingUrl());
      FinishApplicationMasterResponse resp = Records.newRecord(FinishApplicationMasterResponse.class);
      resp.setIsUnregistered(true);
      return resp;
    }
  }

  static String counter(Server server, String name) throws Exception {
    java.lang.reflect.Field f = server.getRpcMetrics().getClass().getDeclaredField(name);
    f.setAccessible(true);
    return String.valueOf(((org.apache.hadoop.metrics2.lib.MutableCounterLong) f.get(
        server.getRpcMetrics())).value());
  }

  public static void main(String[] args) throws Exception {
    Secrets secrets = new Secrets();
    Configuration conf = new Configuration();
    // As ApplicationMasterService: the AM protocol takes AMRMTokens only, secure cluster or not.
    conf.set("hadoop.security.authentication", "TOKEN");
    // authentication (the default), integrity or privacy: SASL's qop, as on the cluster.
    conf.set("hadoop.rpc.protection", args.length > 0 ? args[0] : "authentication");
    Server server = YarnRPC.create(conf).getServer(ApplicationMasterProtocol.class, new Service(),
        new InetSocketAddress("127.0.0.1", 0), conf, secrets, 4);
    server.start();
    int port = server.getListenerAddress().getPort();
    say("ready", null, "port", String.valueOf(port));
    BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
    for (String line; (line = in.readLine()) != null; ) {
      String[] w = line.trim().split("\\s+");
      try {
        if (w[0].equals("STATS")) {  // Hadoop's RpcMetrics counters (package-private fields)
          say("ok", null, "cmd", "STATS",
              "auth_failures", counter(server, "rpcAuthenticationFailures"),
              "auth_successes", counter(server, "rpcAuthenticationSuccesses"));
          continue;
        }
        if (w[0].equals("MINT")) {
          ApplicationAttemptId id = ApplicationAttemptId.fromString(w[1]);
          AMRMTokenIdentifier ident = new AMRMTokenIdentifier(id, 1);
          boolean bad = w.length > 4 && w[4].equals("bad");
          secrets.known.put(w[1], true);  // bad: a known attempt, a forged password
          byte[] password = bad ? secrets.forgedPassword(ident) : secrets.createPassword(ident);
          Token<AMRMTokenIdentifier> token = new Token<>(ident.getBytes(), password,
              ident.getKind(), new Text("127.0.0.1:" + port));
          Credentials creds = new Credentials();
          creds.addToken(new Text("amrm"), token);
          try (DataOutputStream out = new DataOutputStream(new FileOutputStream(w[2]))) {
            creds.writeTokenStorageToStream(out, w[3].equals("protobuf")
                ? Credentials.SerializedFormat.PROTOBUF : Credentials.SerializedFormat.WRITABLE);
          }
        } else if (w[0].equals("SHUTDOWN") || w[0].equals("RESYNC")) {
          attempts.computeIfAbsent(w[1], k -> new Attempt()).next =
              w[0].equals("SHUTDOWN") ? AMCommand.AM_SHUTDOWN : AMCommand.AM_RESYNC;
        } else if (w[0].equals("FORGET")) {  // as an RM that restarted: registrations lost
          attempts.remove(w[1]);
        } else if (w[0].equals("REVOKE")) {
          secrets.known.remove(w[1]);
          attempts.remove(w[1]);
        } else {
          throw new IllegalArgumentException("unknown command " + w[0]);
        }
        say("ok", null, "cmd", line.trim());
      } catch (Exception e) {
        say("ok", null, "cmd", line.trim(), "error", e.toString());
      }
    }
    server.stop();
  }
}
